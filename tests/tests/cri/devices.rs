//! Host devices: `ContainerConfig.devices`, CDI, and privileged containers
//! (which must never receive host devices they did not ask for).
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use capsule_tests::cri::proto::v1::*;
use capsule_tests::cri::spec;
use capsule_tests::cri::suite::Ctx;

use super::lifecycle::SLEEPER;
use super::util::*;

/// Bytes of `file` at `offset`.
fn read_at(file: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(file)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes `marker` at 4 KiB into `dev` inside the container, synced, and
/// checks the host's backing file has it.
fn write_through(ctx: &Ctx, id: &str, dev: &str, marker: &str, backing: &Path) -> Result<()> {
    ctx.sh_ok(
        id,
        &format!("printf '{marker}' | dd of={dev} bs=4096 seek=1 conv=sync,fsync 2>&1"),
    )?;
    let got = read_at(backing, 4096, marker.len())?;
    ensure!(
        got == marker.as_bytes(),
        "{} at 4096 holds {:?} after the container wrote {marker:?} to {dev}",
        backing.display(),
        String::from_utf8_lossy(&got)
    );
    Ok(())
}

pub fn devices(ctx: &mut Ctx) -> Result<()> {
    let (rw_dev, rw_file) = ctx.loop_device(8 << 20)?;
    let (ro_dev, _) = ctx.loop_device(8 << 20)?;
    let (pod, pcfg) = ctx.pod("p")?;
    let mut ccfg = spec::shell("main", SLEEPER);
    ccfg.devices = vec![
        Device {
            container_path: "/dev/xvda".into(),
            host_path: rw_dev.clone(),
            permissions: "rwm".into(),
        },
        Device {
            container_path: "/dev/xvdb".into(),
            host_path: ro_dev.clone(),
            permissions: "r".into(),
        },
    ];
    let id = ctx.start(&pod, &ccfg, &pcfg)?;
    ctx.sh_ok(&id, "test -b /dev/xvda && test -b /dev/xvdb")?;
    write_through(ctx, &id, "/dev/xvda", "capsule-cri-rw", &rw_file)?;
    ctx.sh_ok(&id, "dd if=/dev/xvdb of=/dev/null bs=4096 count=1 2>&1")
        .context("reading the read-only device")?;
    let w = ctx.sh(
        &id,
        "printf x | dd of=/dev/xvdb bs=4096 conv=sync,fsync 2>&1",
    )?;
    ensure!(
        w.exit_code != 0,
        "writing to /dev/xvdb ({ro_dev}, permissions \"r\") succeeded: {}",
        String::from_utf8_lossy(&w.stdout)
    );
    Ok(())
}

/// A device named through a CDI spec in the node's CDI directory.
pub fn cdi_device(ctx: &mut Ctx) -> Result<()> {
    let (dev, file) = ctx.loop_device(8 << 20)?;
    let kind = format!("capsule.test/{}", ctx.handler());
    let spec_json = serde_json::json!({
        "cdiVersion": "0.6.0",
        "kind": kind,
        "devices": [{
            "name": "disk0",
            "containerEdits": {
                "deviceNodes": [{"path": "/dev/xvdc", "hostPath": dev, "permissions": "rwm"}],
                "env": ["CAPSULE_CDI=disk0"]
            }
        }]
    });
    let spec_file = ctx.node.cdi_dir.join(format!("{}.json", ctx.handler()));
    std::fs::write(&spec_file, serde_json::to_vec_pretty(&spec_json)?)?;
    ctx.defer(move || {
        let _ = std::fs::remove_file(&spec_file);
    });
    // containerd's CDI cache picks new spec files up asynchronously.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (pod, pcfg) = ctx.pod("p")?;
    let mut ccfg = spec::shell("main", SLEEPER);
    ccfg.cdi_devices = vec![CdiDevice {
        name: format!("{kind}=disk0"),
    }];
    let id = ctx.start(&pod, &ccfg, &pcfg)?;
    ctx.sh_ok(&id, "test -b /dev/xvdc && test \"$CAPSULE_CDI\" = disk0")?;
    write_through(ctx, &id, "/dev/xvdc", "capsule-cri-cdi", &file)?;
    Ok(())
}

/// The capsule VM's device list as `capsule inspect` reports it.
fn vm_devices(ctx: &Ctx, pod: &str) -> Result<serde_json::Value> {
    let o = ctx.node.capsule(&["inspect", pod, "--json"])?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "capsule inspect {pod} --json: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    let d = v["vm_devices"].clone();
    ensure!(
        !d.is_null(),
        "capsule inspect {pod}: no VM device list ({})",
        v["vm_error"]
    );
    Ok(d)
}

pub fn privileged(ctx: &mut Ctx) -> Result<()> {
    let (host_loop, _) = ctx.loop_device(8 << 20)?;
    let (pod, pcfg) = {
        let mut p = ctx.pod_config("p")?;
        spec::pod_security(&mut p).privileged = true;
        let id = ctx.run_pod(&p)?;
        (id, p)
    };
    let before = if ctx.is_capsule() {
        Some(vm_devices(ctx, &pod)?)
    } else {
        None
    };
    let mut ccfg = spec::shell("main", SLEEPER);
    spec::security(&mut ccfg).privileged = true;
    let id = ctx.start(&pod, &ccfg, &pcfg)?;
    let last: u32 = ctx
        .sh_ok(&id, "cat /proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .context("cap_last_cap")?;
    let all: Vec<u32> = (0..=last).collect();
    // containerd lists the capabilities it has itself (this host's bounding
    // set: CI sandboxes drop some, e.g. CAP_SYS_RESOURCE): runc can give no
    // more, and capsule gives what the spec lists, no more either.
    let want = {
        let host = std::fs::read_to_string("/proc/self/status")?;
        let bnd = host
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .context("no CapBnd in /proc/self/status")?;
        let bnd = u64::from_str_radix(bnd.trim(), 16)?;
        let full = u64::from_str_radix(&cap_mask(&all), 16)?;
        format!("{:016x}", bnd & full)
    };
    let eff = proc1_status(ctx, &id, "CapEff")?;
    ensure!(
        eff == want,
        "privileged CapEff {eff}, expected {want} (capabilities 0..={last})"
    );
    let ndev: usize = ctx.sh_ok(&id, "ls /dev | wc -l")?.trim().parse()?;
    ensure!(
        ndev > 10,
        "a privileged container sees only {ndev} entries in /dev"
    );
    ctx.sh_ok(
        &id,
        "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m && umount /tmp/m",
    )
    .context("a privileged container mounting a tmpfs")?;
    if let Some(before) = before {
        let after = vm_devices(ctx, &pod)?;
        ensure!(
            before["devices"] == after["devices"] && before["block_nodes"] == after["block_nodes"],
            "the privileged container changed the VM's devices (host loop device {host_loop} present on the host):\nbefore {before}\nafter {after}"
        );
        let text = after.to_string();
        ensure!(
            !text.contains(&host_loop),
            "the VM has host device {host_loop}: {text}"
        );
        ctx.note(format!("VM devices unchanged; {ndev} entries in /dev"));
    } else {
        // runc hands every host device to a privileged container.
        ctx.sh_ok(&id, &format!("test -b {host_loop}"))?;
    }
    Ok(())
}
