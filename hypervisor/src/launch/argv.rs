//! The QEMU command line, as a pure function of the config.
use std::os::fd::RawFd;
use std::path::Path;

use crate::config::{Accel, MachineType, VmConfig};
use crate::hotplug::{DevicePlan, Step};
use crate::layout::{
    root_port_slot, PC_SLOT_BALLOON, Q35_SLOT_BALLOON, SLOT_RNG, SLOT_VIRTIO_SCSI,
    SLOT_VIRTIO_SERIAL, SLOT_VSOCK,
};

/// Name of the virtio-serial port the guest agent listens on.
pub const AGENT_PORT_NAME: &str = "agent.channel.0";

/// A cold-plugged device: its plan and the descriptors QEMU inherits: for
/// vhost-user the vetted backend connection, for a network endpoint its tap
/// queues.
#[derive(Debug, Clone)]
pub struct ColdDevice {
    pub plan: DevicePlan,
    pub chardev_fd: Option<RawFd>,
    pub tap_fds: Vec<RawFd>,
}

/// Inputs of [`build_argv`] decided at start time.
#[derive(Debug, Clone)]
pub struct ArgvInput<'a> {
    pub config: &'a VmConfig,
    pub accel: Accel,
    /// Add vhost-vsock-pci (the host has the device).
    pub vsock: bool,
    pub coldplug: &'a [ColdDevice],
}

/// Escapes a value for QEMU's `key=value,...` option syntax.
pub fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", p.display()))
}

/// Builds the argument vector (without the binary).
pub fn build_argv(input: &ArgvInput<'_>) -> Result<Vec<String>, String> {
    let cfg = input.config;
    cfg.validate()?;
    let mut a: Vec<String> = Vec::new();
    let mut push = |k: &str, v: String| {
        a.push(k.to_owned());
        a.push(v);
    };
    let mut machine = cfg.machine.qemu_name().to_owned();
    if cfg.shared_memory {
        machine.push_str(",memory-backend=mem");
    }
    if cfg.pmem.is_some() {
        machine.push_str(",nvdimm=on");
    }
    push("-machine", machine);
    let accel = match input.accel {
        Accel::Tcg => format!("tcg,tb-size={}", cfg.tcg_tb_size_mib),
        other => other.qemu_name().into(),
    };
    push("-accel", accel);
    if input.accel == Accel::Kvm {
        push("-cpu", "host".into());
    }
    push("-smp", cfg.vcpus.to_string());
    let mut mem = format!("{}M", cfg.memory_mb);
    if let Some(p) = &cfg.pmem {
        mem.push_str(&format!(",slots={},maxmem={}M", p.slots, p.maxmem_mb));
    }
    push("-m", mem);
    if cfg.shared_memory {
        push(
            "-object",
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                cfg.memory_mb
            ),
        );
    }
    if let Some(kernel) = &cfg.kernel {
        push("-kernel", path_str(kernel)?.into());
        if let Some(initrd) = &cfg.initrd {
            push("-initrd", path_str(initrd)?.into());
        }
        push("-append", cfg.cmdline.clone());
    }
    a.extend(
        [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        .map(String::from),
    );
    if cfg.seccomp_sandbox {
        // QEMU's own seccomp filter: no obsolete syscalls, no privilege
        // changes, no fork/exec, no scheduler or resource changes.
        a.push("-sandbox".into());
        a.push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into());
    }
    let mut push = |k: &str, v: String| {
        a.push(k.to_owned());
        a.push(v);
    };
    push(
        "-chardev",
        format!(
            "file,id=console0,path={}",
            escape_opt(path_str(&cfg.console_log())?)
        ),
    );
    push("-serial", "chardev:console0".into());
    push(
        "-chardev",
        format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            escape_opt(path_str(&cfg.qmp_socket())?)
        ),
    );
    push("-mon", "chardev=qmp0,mode=control".into());
    push("-pidfile", path_str(&cfg.pidfile())?.into());

    let root = cfg.machine.root_bus();
    if cfg.machine == MachineType::Q35 {
        for n in 0..cfg.pcie_root_ports {
            push(
                "-device",
                format!(
                    "pcie-root-port,id=rp{n},bus={root},chassis={c},slot={c},addr={:#04x}",
                    root_port_slot(n),
                    c = n + 1
                ),
            );
        }
    }
    push(
        "-device",
        format!("virtio-serial-pci,id=vser0,bus={root},addr={SLOT_VIRTIO_SERIAL:#04x}"),
    );
    push(
        "-chardev",
        format!(
            "socket,id=agent0,path={},server=on,wait=off",
            escape_opt(path_str(&cfg.agent_socket())?)
        ),
    );
    push(
        "-device",
        format!("virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}"),
    );
    if input.vsock {
        push(
            "-device",
            format!(
                "vhost-vsock-pci,id=vsock0,guest-cid={},bus={root},addr={SLOT_VSOCK:#04x}",
                cfg.agent.guest_cid
            ),
        );
    }
    if cfg.scsi_controller() {
        push(
            "-device",
            format!("virtio-scsi-pci,id=scsi0,bus={root},addr={SLOT_VIRTIO_SCSI:#04x}"),
        );
    }
    if cfg.rng {
        push("-object", "rng-builtin,id=rng0".into());
        push(
            "-device",
            format!("virtio-rng-pci,id=rng0dev,rng=rng0,bus={root},addr={SLOT_RNG:#04x}"),
        );
    }
    if cfg.balloon {
        let slot = match cfg.machine {
            MachineType::Pc => PC_SLOT_BALLOON,
            MachineType::Q35 => Q35_SLOT_BALLOON,
        };
        push(
            "-device",
            format!(
                "virtio-balloon-pci,id=balloon0,free-page-reporting=on,bus={root},addr={slot:#04x}"
            ),
        );
    }
    for dev in input.coldplug {
        for step in &dev.plan.steps {
            match step {
                Step::Blockdev { args, .. } => push("-blockdev", args.to_string()),
                Step::Object { args, .. } => push("-object", args.to_string()),
                Step::Device { args, .. } => push("-device", args.to_string()),
                Step::VhostChardev { id, .. } => {
                    let fd = dev.chardev_fd.ok_or_else(|| {
                        format!(
                            "device {}: cold-plugged vhost-user without a vetted fd",
                            dev.plan.id
                        )
                    })?;
                    push("-chardev", format!("socket,id={id},fd={fd}"));
                }
                Step::TapNetdev { id, tap, queues } => {
                    if dev.tap_fds.len() != *queues as usize || dev.tap_fds.is_empty() {
                        return Err(format!(
                            "device {}: tap {tap} needs {queues} queue descriptor(s), {} inherited",
                            dev.plan.id,
                            dev.tap_fds.len()
                        ));
                    }
                    let fds: Vec<String> = dev.tap_fds.iter().map(|f| f.to_string()).collect();
                    let fds = match fds.as_slice() {
                        [one] => format!("fd={one}"),
                        many => format!("fds={}", many.join(":")),
                    };
                    push("-netdev", format!("tap,id={id},{fds}"));
                }
            }
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PmemConfig;
    use capsule_device_api::BlockDriver;
    use serde_json::json;

    fn cfg() -> VmConfig {
        let mut c = VmConfig::new("/run/vm1");
        c.kernel = Some("/img/vmlinuz".into());
        c.initrd = Some("/img/initrd".into());
        c.cmdline = "console=ttyS0 quiet".into();
        c
    }

    fn pairs(a: &[String], flag: &str) -> Vec<String> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn pc_defaults() {
        let c = cfg();
        let a = build_argv(&ArgvInput {
            config: &c,
            accel: Accel::Tcg,
            vsock: false,
            coldplug: &[],
        })
        .unwrap();
        assert_eq!(pairs(&a, "-machine"), ["pc,memory-backend=mem"]);
        assert_eq!(pairs(&a, "-accel"), ["tcg,tb-size=16"]);
        assert!(pairs(&a, "-cpu").is_empty());
        assert_eq!(pairs(&a, "-m"), ["256M"]);
        assert_eq!(
            pairs(&a, "-object"),
            [
                "memory-backend-memfd,id=mem,size=256M,share=on",
                "rng-builtin,id=rng0"
            ]
        );
        assert_eq!(pairs(&a, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(pairs(&a, "-initrd"), ["/img/initrd"]);
        assert_eq!(pairs(&a, "-append"), ["console=ttyS0 quiet"]);
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(a.iter().any(|x| x == flag), "{flag}");
        }
        assert_eq!(pairs(&a, "-display"), ["none"]);
        assert_eq!(pairs(&a, "-pidfile"), ["/run/vm1/qemu.pid"]);
        assert_eq!(pairs(&a, "-serial"), ["chardev:console0"]);
        let chardevs = pairs(&a, "-chardev");
        assert!(chardevs.contains(&"file,id=console0,path=/run/vm1/console.log".to_owned()));
        assert!(chardevs
            .contains(&"socket,id=qmp0,path=/run/vm1/qmp.sock,server=on,wait=off".to_owned()));
        assert!(chardevs
            .contains(&"socket,id=agent0,path=/run/vm1/agent.sock,server=on,wait=off".to_owned()));
        let devices = pairs(&a, "-device");
        assert_eq!(
            devices,
            [
                "virtio-serial-pci,id=vser0,bus=pci.0,addr=0x02",
                "virtserialport,bus=vser0.0,chardev=agent0,name=agent.channel.0",
                "virtio-scsi-pci,id=scsi0,bus=pci.0,addr=0x03",
                "virtio-rng-pci,id=rng0dev,rng=rng0,bus=pci.0,addr=0x05",
                "virtio-balloon-pci,id=balloon0,free-page-reporting=on,bus=pci.0,addr=0x1f",
            ]
        );
        assert_eq!(pairs(&a, "-mon"), ["chardev=qmp0,mode=control"]);
        assert_eq!(
            pairs(&a, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        let mut open = c.clone();
        open.seccomp_sandbox = false;
        let a = build_argv(&ArgvInput {
            config: &open,
            accel: Accel::Tcg,
            vsock: false,
            coldplug: &[],
        })
        .unwrap();
        assert!(pairs(&a, "-sandbox").is_empty());
    }

    #[test]
    fn q35_kvm_pmem_vsock_no_scsi_no_shm() {
        let mut c = cfg();
        c.machine = MachineType::Q35;
        c.pcie_root_ports = 2;
        c.shared_memory = false;
        c.block_driver = BlockDriver::VirtioBlk;
        c.pmem = Some(PmemConfig {
            slots: 4,
            maxmem_mb: 1024,
        });
        c.vcpus = 2;
        c.agent.guest_cid = 7;
        let a = build_argv(&ArgvInput {
            config: &c,
            accel: Accel::Kvm,
            vsock: true,
            coldplug: &[],
        })
        .unwrap();
        assert_eq!(pairs(&a, "-machine"), ["q35,nvdimm=on"]);
        assert_eq!(pairs(&a, "-cpu"), ["host"]);
        assert_eq!(pairs(&a, "-smp"), ["2"]);
        assert_eq!(pairs(&a, "-m"), ["256M,slots=4,maxmem=1024M"]);
        assert!(!pairs(&a, "-object").iter().any(|o| o.contains("memfd")));
        let devices = pairs(&a, "-device");
        assert_eq!(
            devices[0],
            "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1,addr=0x08"
        );
        assert_eq!(
            devices[1],
            "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,slot=2,addr=0x09"
        );
        assert!(devices
            .contains(&"vhost-vsock-pci,id=vsock0,guest-cid=7,bus=pcie.0,addr=0x04".to_owned()));
        assert!(!devices.iter().any(|d| d.contains("virtio-scsi")));
    }

    #[test]
    fn no_kernel_and_comma_paths() {
        let mut c = VmConfig::new("/run/a,b");
        c.accel = crate::config::AccelMode::Tcg;
        let a = build_argv(&ArgvInput {
            config: &c,
            accel: Accel::Tcg,
            vsock: false,
            coldplug: &[],
        })
        .unwrap();
        assert!(pairs(&a, "-kernel").is_empty());
        assert!(pairs(&a, "-append").is_empty());
        assert!(pairs(&a, "-chardev")
            .contains(&"socket,id=qmp0,path=/run/a,,b/qmp.sock,server=on,wait=off".to_owned()));
    }

    #[test]
    fn coldplug_devices_become_arguments() {
        let c = cfg();
        let plan = DevicePlan {
            id: "d1".into(),
            kind: "vhost-user-fs",
            steps: vec![
                Step::VhostChardev {
                    id: "cap-d1-chr".into(),
                    socket: "/s".into(),
                },
                Step::Device {
                    id: "cap-d1".into(),
                    args: json!({"driver": "vhost-user-fs-pci", "id": "cap-d1"}),
                },
            ],
            address: crate::hotplug::AddressPlan::None,
            vhost_socket: Some("/s".into()),
            unplug_unsupported: None,
        };
        let blk = DevicePlan {
            id: "d2".into(),
            kind: "virtio-blk",
            steps: vec![
                Step::Blockdev {
                    node: "cap-d2-node".into(),
                    args: json!({"driver": "raw", "node-name": "cap-d2-node"}),
                },
                Step::Object {
                    id: "cap-d2-mem".into(),
                    args: json!({"qom-type": "x", "id": "cap-d2-mem"}),
                },
            ],
            address: crate::hotplug::AddressPlan::None,
            vhost_socket: None,
            unplug_unsupported: None,
        };
        let cold = [
            ColdDevice {
                plan: plan.clone(),
                chardev_fd: Some(9),
                tap_fds: vec![],
            },
            ColdDevice {
                plan: blk,
                chardev_fd: None,
                tap_fds: vec![],
            },
        ];
        let a = build_argv(&ArgvInput {
            config: &c,
            accel: Accel::Tcg,
            vsock: false,
            coldplug: &cold,
        })
        .unwrap();
        assert!(pairs(&a, "-chardev").contains(&"socket,id=cap-d1-chr,fd=9".to_owned()));
        assert!(pairs(&a, "-device")
            .contains(&r#"{"driver":"vhost-user-fs-pci","id":"cap-d1"}"#.to_owned()));
        assert_eq!(
            pairs(&a, "-blockdev"),
            [r#"{"driver":"raw","node-name":"cap-d2-node"}"#]
        );
        assert!(pairs(&a, "-object").contains(&r#"{"id":"cap-d2-mem","qom-type":"x"}"#.to_owned()));
        let missing = [ColdDevice {
            plan,
            chardev_fd: None,
            tap_fds: vec![],
        }];
        assert!(build_argv(&ArgvInput {
            config: &c,
            accel: Accel::Tcg,
            vsock: false,
            coldplug: &missing
        })
        .is_err());
    }

    #[test]
    fn network_endpoints_get_their_tap_queues() {
        use capsule_device_api::{AttachRequest, DeviceKind, NetEndpoint};
        let c = cfg();
        let ep = |queues| NetEndpoint {
            netns: "/run/netns/p1".into(),
            netns_id: None,
            link: "eth0".into(),
            link_index: 2,
            tap: "cap_eth0".into(),
            mac: "02:42:0a:00:00:02".into(),
            mtu: 1450,
            queues,
            link_qdisc_created: true,
        };
        let req = |queues| AttachRequest {
            id: "dev3".into(),
            kind: DeviceKind::Network(ep(queues)),
            host_path: "/run/netns/p1".into(),
            read_only: false,
            driver: None,
            block_index: None,
            drive_name: None,
            scsi_addr: None,
            pmem_index: None,
            pci_slots: vec![9],
        };
        let layout = crate::launch::layout_of(&c);
        let argv = |queues, fds: Vec<RawFd>| {
            let plan = crate::hotplug::plan(&req(queues), &layout).unwrap();
            build_argv(&ArgvInput {
                config: &c,
                accel: Accel::Tcg,
                vsock: false,
                coldplug: &[ColdDevice {
                    plan,
                    chardev_fd: None,
                    tap_fds: fds,
                }],
            })
        };
        let a = argv(1, vec![7]).unwrap();
        assert_eq!(pairs(&a, "-netdev"), ["tap,id=cap-dev3-net,fd=7"]);
        let dev: serde_json::Value =
            serde_json::from_str(pairs(&a, "-device").last().unwrap()).unwrap();
        assert_eq!(
            dev,
            json!({"driver": "virtio-net-pci", "id": "cap-dev3", "netdev": "cap-dev3-net",
                   "mac": "02:42:0a:00:00:02", "host_mtu": 1450, "bus": "pci.0", "addr": "0x09"})
        );
        let a = argv(2, vec![7, 8]).unwrap();
        assert_eq!(pairs(&a, "-netdev"), ["tap,id=cap-dev3-net,fds=7:8"]);
        let dev: serde_json::Value =
            serde_json::from_str(pairs(&a, "-device").last().unwrap()).unwrap();
        assert_eq!(
            (dev["mq"].clone(), dev["vectors"].clone()),
            (json!(true), json!(6))
        );
        let e = argv(2, vec![7]).unwrap_err();
        assert!(
            e.contains("needs 2 queue descriptor(s), 1 inherited"),
            "{e}"
        );
        let mut bad = req(1);
        if let DeviceKind::Network(ep) = &mut bad.kind {
            ep.mtu = 65535;
        }
        let e = crate::hotplug::plan(&bad, &layout).unwrap_err();
        assert!(e.message.contains("MTU 65535 of eth0"), "{e}");
    }
}
