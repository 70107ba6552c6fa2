//! Guest cgroup statistics → containerd's metrics types, packed as `Any`
//! with the bare type names `ctr task metrics` looks up
//! (`io.containerd.cgroups.v1.Metrics` / `io.containerd.cgroups.v2.Metrics`).
use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};

use crate::error::{Error, Result};
use crate::sandbox::GuestStats;

pub const V1_TYPE: &str = "io.containerd.cgroups.v1.Metrics";
pub const V2_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

pub fn v2_metrics(s: &GuestStats) -> v2::Metrics {
    let c = &s.cgroup;
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: c.pids_current,
            limit: c.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: c.cpu_usage_usec,
            user_usec: c.cpu_user_usec,
            system_usec: c.cpu_system_usec,
            nr_throttled: c.cpu_nr_throttled,
            throttled_usec: c.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            usage: c.memory_usage_bytes,
            usage_limit: c.memory_limit_bytes,
            max_usage: c.memory_max_usage_bytes,
            swap_usage: c.memory_swap_bytes,
            file: c.memory_cache_bytes,
            anon: c.memory_rss_bytes,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn v1_metrics(s: &GuestStats) -> v1::Metrics {
    let c = &s.cgroup;
    v1::Metrics {
        pids: MessageField::some(v1::PidsStat {
            current: c.pids_current,
            limit: c.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v1::CPUStat {
            usage: MessageField::some(v1::CPUUsage {
                total: c.cpu_usage_usec.saturating_mul(1000),
                kernel: c.cpu_system_usec.saturating_mul(1000),
                user: c.cpu_user_usec.saturating_mul(1000),
                ..Default::default()
            }),
            throttling: MessageField::some(v1::Throttle {
                throttled_periods: c.cpu_nr_throttled,
                throttled_time: c.cpu_throttled_usec.saturating_mul(1000),
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(v1::MemoryStat {
            cache: c.memory_cache_bytes,
            rss: c.memory_rss_bytes,
            usage: MessageField::some(v1::MemoryEntry {
                usage: c.memory_usage_bytes,
                limit: c.memory_limit_bytes,
                max: c.memory_max_usage_bytes,
                ..Default::default()
            }),
            swap: MessageField::some(v1::MemoryEntry {
                usage: c.memory_swap_bytes,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The metrics of the guest's cgroup version, as containerd expects them.
pub fn to_any(s: &GuestStats) -> Result<Any> {
    let enc = |e: containerd_shim_protos::protobuf::Error| {
        Error::internal(format!("encoding metrics: {e}"))
    };
    let (type_url, value) = match s.version.as_str() {
        "v1" => (V1_TYPE, v1_metrics(s).write_to_bytes().map_err(enc)?),
        _ => (V2_TYPE, v2_metrics(s).write_to_bytes().map_err(enc)?),
    };
    Ok(Any {
        type_url: type_url.into(),
        value,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_agent_protocol::agent::CgroupStats;

    #[test]
    fn converts_both_versions() {
        let s = GuestStats {
            cgroup: CgroupStats {
                cpu_usage_usec: 1500,
                memory_usage_bytes: 4096,
                memory_limit_bytes: 1 << 20,
                pids_current: 3,
                ..Default::default()
            },
            version: "v2".into(),
        };
        let any = to_any(&s).unwrap();
        assert_eq!(any.type_url, V2_TYPE);
        let m = v2::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.pids.current, 3);
        let s1 = GuestStats {
            version: "v1".into(),
            ..s
        };
        let any = to_any(&s1).unwrap();
        assert_eq!(any.type_url, V1_TYPE);
        let m = v1::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage.total, 1_500_000);
        assert_eq!(m.memory.usage.limit, 1 << 20);
    }
}
