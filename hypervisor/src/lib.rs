//! Hypervisor backend: arrives with the hypervisor step (issue 3).
