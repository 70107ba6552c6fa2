//! Agent round-trip latency of a no-op RPC (Health) through the
//! virtio-serial transport of a real guest under QEMU.
//!
//!   cargo bench -p capsule-agent --bench roundtrip            (TCG)
//!   CAPSULE_TEST_ACCEL=kvm cargo bench -p capsule-agent --bench roundtrip
//!   ROUNDTRIP_N=5000 ...                                       (calls, default 2000)
//!
//! Prints min / median / p90 / p99 / max and writes them as JSON to
//! target/bench/agent-roundtrip.json.
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use capsule_agent_protocol::agent::HealthRequest;

fn main() {
    let n: usize = std::env::var("ROUNDTRIP_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let accel = std::env::var("CAPSULE_TEST_ACCEL").unwrap_or_else(|_| "tcg".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let samples = rt.block_on(async {
        let vm = support::Vm::boot(support::VmOptions::default()).await;
        let boot = Instant::now();
        let conn = vm.connect().await;
        eprintln!("agent ready {:?} after connect start", boot.elapsed());
        let req = HealthRequest::new();
        for _ in 0..100 {
            conn.health(&req).await.expect("warm-up Health");
        }
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            conn.health(&req).await.expect("Health");
            samples.push(t.elapsed());
        }
        drop(conn);
        vm.shutdown().await;
        samples
    });
    let mut s = samples;
    s.sort();
    let pct = |p: f64| s[((s.len() as f64 - 1.0) * p).round() as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (min, med, p90, p99, max) = (s[0], pct(0.5), pct(0.9), pct(0.99), s[s.len() - 1]);
    println!(
        "agent round-trip (Health over virtio-serial, {accel}, {n} calls): min {:.0} us, median {:.0} us, p90 {:.0} us, p99 {:.0} us, max {:.0} us",
        us(min),
        us(med),
        us(p90),
        us(p99),
        us(max)
    );
    let out = support::workspace().join("target/bench");
    let _ = std::fs::create_dir_all(&out);
    let json = serde_json::json!({
        "bench": "agent-roundtrip", "transport": "virtio-serial", "accel": accel, "calls": n,
        "min_us": us(min), "median_us": us(med), "p90_us": us(p90), "p99_us": us(p99), "max_us": us(max),
    });
    let _ = std::fs::write(
        out.join("agent-roundtrip.json"),
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
}
