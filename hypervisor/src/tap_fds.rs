//! Tap queue descriptors on their way to QEMU.
//!
//! A network endpoint's tap is made (and its queues opened, inside the
//! pod's network namespace) by whoever plumbs the pod network; the
//! descriptors cannot be persisted with the device's request. They are
//! handed over here, keyed by tap name, and the cold-plug or hotplug of
//! that endpoint takes them: QEMU gets its own copies, this process's go.
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

/// Tap queues waiting for their endpoint's plug.
#[derive(Debug, Default)]
pub struct TapFds {
    queues: Mutex<HashMap<String, Vec<OwnedFd>>>,
}

impl TapFds {
    /// Hands over the queues of `tap` (replacing any not taken yet).
    pub fn hand_over(&self, tap: &str, queues: Vec<OwnedFd>) {
        let old = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tap.to_string(), queues);
        if old.is_some() {
            tracing::warn!(tap, "replacing tap queues that were never plugged");
        }
    }

    /// Takes the queues of `tap`, which must be exactly `count`.
    pub fn take(&self, tap: &str, count: u32) -> Result<Vec<OwnedFd>, String> {
        let mut map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        match map.remove(tap) {
            Some(q) if q.len() == count as usize => Ok(q),
            Some(q) => {
                let n = q.len();
                Err(format!(
                    "tap {tap}: {n} queue descriptor(s) handed over, the endpoint needs {count}"
                ))
            }
            None => Err(format!(
                "tap {tap}: no queue descriptors were handed over (the endpoint must be plumbed first)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_taken_once_and_counted() {
        let t = TapFds::default();
        assert!(t.take("tap0", 1).unwrap_err().contains("plumbed first"));
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        t.hand_over("tap0", vec![fd(), fd()]);
        assert!(t.take("tap0", 1).unwrap_err().contains("2 queue"));
        t.hand_over("tap0", vec![fd(), fd()]);
        assert_eq!(t.take("tap0", 2).unwrap().len(), 2);
        assert!(t.take("tap0", 2).is_err());
    }
}
