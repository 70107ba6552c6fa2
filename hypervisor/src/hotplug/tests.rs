//! Planner tests: QEMU arguments per kind, without QEMU.
use std::path::PathBuf;

use serde_json::json;

use capsule_device_api::{AttachRequest, BackendErrorKind};
use capsule_device_api::{
    Bdf, BlockDriver, DeviceKind, ScsiAddr, VfioFunction, VfioGroup, VfioMode, VhostUserKind,
};

use super::*;
use crate::config::MachineType;

fn layout(machine: MachineType) -> VmLayout {
    VmLayout {
        machine,
        root_ports: 4,
        shared_memory: true,
        scsi_controller: true,
        nvdimm: true,
    }
}

fn req(id: &str, kind: DeviceKind, host_path: PathBuf) -> AttachRequest {
    AttachRequest {
        id: id.into(),
        kind,
        host_path,
        read_only: false,
        driver: None,
        block_index: None,
        drive_name: None,
        scsi_addr: None,
        pmem_index: None,
        pci_slots: vec![],
    }
}

fn with_slots(mut r: AttachRequest, slots: &[u32]) -> AttachRequest {
    r.pci_slots = slots.to_vec();
    r
}

fn disk(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

#[test]
fn virtio_blk_on_pc_and_q35() {
    let f = disk(1 << 20);
    let mut r = req("dev1", DeviceKind::Block, f.path().into());
    r.driver = Some(BlockDriver::VirtioBlk);
    r.read_only = true;
    r.pci_slots = vec![7];
    let p = plan(&r, &layout(MachineType::Pc)).unwrap();
    assert_eq!(p.steps.len(), 2);
    let Step::Blockdev { node, args } = &p.steps[0] else {
        panic!("{p:?}")
    };
    assert_eq!(node, "cap-dev1-node");
    assert_eq!(args["driver"], "raw");
    assert_eq!(args["read-only"], true);
    assert_eq!(
        args["file"],
        json!({"driver": "file", "filename": f.path().to_str().unwrap(), "aio": "threads"})
    );
    let Step::Device { id, args } = &p.steps[1] else {
        panic!("{p:?}")
    };
    assert_eq!(id, "cap-dev1");
    assert_eq!(
        *args,
        json!({"driver": "virtio-blk-pci", "id": "cap-dev1", "drive": "cap-dev1-node", "serial": "dev1", "bus": "pci.0", "addr": "0x07"})
    );
    assert_eq!(
        p.address,
        AddressPlan::Pci {
            device: "cap-dev1".into(),
            predicted: Some("07".parse().unwrap())
        }
    );

    r.pci_slots = vec![2];
    let p = plan(&r, &layout(MachineType::Q35)).unwrap();
    let Step::Device { args, .. } = &p.steps[1] else {
        panic!()
    };
    assert_eq!(
        (args["bus"].as_str(), args["addr"].as_str()),
        (Some("rp2"), Some("0x0"))
    );
    assert_eq!(
        p.address,
        AddressPlan::Pci {
            device: "cap-dev1".into(),
            predicted: Some("0a/00".parse().unwrap())
        }
    );

    // No slot: refused (the device manager allocates every slot).
    r.pci_slots.clear();
    let e = plan(&r, &layout(MachineType::Pc)).unwrap_err();
    assert!(
        e.message
            .contains("needs 1 allocated PCI slot(s), the request carries 0"),
        "{e}"
    );
}

#[test]
fn block_device_uses_host_device_driver() {
    // /dev/null is a char device: refused; a real block device may not
    // exist in the test environment, so only the refusal is checked.
    let mut r = req("dev1", DeviceKind::Block, "/dev/null".into());
    r.driver = Some(BlockDriver::VirtioBlk);
    r.pci_slots = vec![7];
    let e = plan(&r, &layout(MachineType::Pc)).unwrap_err();
    assert!(
        e.message
            .contains("neither a block device nor a regular file"),
        "{e}"
    );
    let mut r = req("dev1", DeviceKind::Block, "/nonexistent/disk".into());
    r.driver = Some(BlockDriver::VirtioBlk);
    r.pci_slots = vec![7];
    let e = plan(&r, &layout(MachineType::Pc)).unwrap_err();
    assert!(
        e.message.contains("/nonexistent/disk") && e.message.contains("dev1"),
        "{e}"
    );
}

#[test]
fn scsi_hd_needs_controller_and_address() {
    let f = disk(1 << 20);
    let mut r = req("dev2", DeviceKind::Block, f.path().into());
    r.scsi_addr = Some(ScsiAddr { id: 1, lun: 3 });
    let p = plan(&r, &layout(MachineType::Pc)).unwrap();
    let Step::Device { args, .. } = &p.steps[1] else {
        panic!()
    };
    assert_eq!(
        *args,
        json!({"driver": "scsi-hd", "id": "cap-dev2", "bus": "scsi0.0", "drive": "cap-dev2-node", "channel": 0, "scsi-id": 1, "lun": 3, "serial": "dev2"})
    );
    assert_eq!(p.address, AddressPlan::Scsi(ScsiAddr { id: 1, lun: 3 }));
    let mut no_ctrl = layout(MachineType::Pc);
    no_ctrl.scsi_controller = false;
    assert_eq!(
        plan(&r, &no_ctrl).unwrap_err().kind,
        BackendErrorKind::Unsupported
    );
    r.scsi_addr = None;
    r.block_index = Some(258);
    let p = plan(&r, &layout(MachineType::Pc)).unwrap();
    assert_eq!(p.address, AddressPlan::Scsi(ScsiAddr { id: 1, lun: 2 }));
    r.block_index = None;
    assert!(plan(&r, &layout(MachineType::Pc)).is_err());
}

#[test]
fn vhost_user_kinds() {
    let kind = |vhost, tag: &str| DeviceKind::VhostUser {
        vhost,
        socket: "/run/vu.sock".into(),
        tag: tag.into(),
    };
    let r = with_slots(
        req("dev3", kind(VhostUserKind::Blk, ""), "/run".into()),
        &[8],
    );
    let p = plan(&r, &layout(MachineType::Pc)).unwrap();
    assert_eq!(p.vhost_socket, Some(PathBuf::from("/run/vu.sock")));
    assert_eq!(
        p.steps[0],
        Step::VhostChardev {
            id: "cap-dev3-chr".into(),
            socket: "/run/vu.sock".into()
        }
    );
    let Step::Device { args, .. } = &p.steps[1] else {
        panic!()
    };
    assert_eq!(
        *args,
        json!({"driver": "vhost-user-blk-pci", "id": "cap-dev3", "chardev": "cap-dev3-chr", "num-queues": 1, "bus": "pci.0", "addr": "0x08"})
    );
    let p = plan(
        &with_slots(
            req("dev4", kind(VhostUserKind::Scsi, ""), "/run".into()),
            &[9],
        ),
        &layout(MachineType::Pc),
    )
    .unwrap();
    let Step::Device { args, .. } = &p.steps[1] else {
        panic!()
    };
    assert_eq!(args["driver"], "vhost-user-scsi-pci");
    let p = plan(
        &with_slots(
            req("dev5", kind(VhostUserKind::Fs, "myfs"), "/run".into()),
            &[9],
        ),
        &layout(MachineType::Pc),
    )
    .unwrap();
    let Step::Device { args, .. } = &p.steps[1] else {
        panic!()
    };
    assert_eq!(
        (args["driver"].as_str(), args["tag"].as_str()),
        (Some("vhost-user-fs-pci"), Some("myfs"))
    );
    assert!(plan(
        &with_slots(
            req("dev5", kind(VhostUserKind::Fs, ""), "/run".into()),
            &[9]
        ),
        &layout(MachineType::Pc),
    )
    .is_err());
    let e = plan(
        &with_slots(
            req("dev6", kind(VhostUserKind::Net, ""), "/run".into()),
            &[9],
        ),
        &layout(MachineType::Pc),
    )
    .unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Unsupported);

    let mut no_shm = layout(MachineType::Pc);
    no_shm.shared_memory = false;
    let e = plan(&r, &no_shm).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::Unsupported);
    assert!(
        e.message.contains("shared") && e.message.contains("dev3"),
        "{e}"
    );
}

#[test]
fn vfio_group_plans_every_function() {
    let f = |bdf: &str| VfioFunction::Pci {
        bdf: bdf.parse::<Bdf>().unwrap(),
        vendor: 0x8086,
        device: 0x1234,
        class: 0x020000,
        is_pcie: true,
        large_bar: false,
    };
    let group = VfioGroup {
        group: "12".into(),
        mode: VfioMode::Legacy,
        functions: vec![
            f("0000:3b:00.0"),
            f("0000:3b:00.1"),
            VfioFunction::Mediated {
                uuid: "u".into(),
                sysfsdev: "/sys/devices/x/u".into(),
            },
        ],
    };
    let r = with_slots(
        req("dev7", DeviceKind::Vfio(group), "/dev/vfio/12".into()),
        &[0, 1, 3],
    );
    let p = plan(&r, &layout(MachineType::Q35)).unwrap();
    assert_eq!(p.device_ids(), ["cap-dev7", "cap-dev7-fn1", "cap-dev7-fn2"]);
    let Step::Device { args, .. } = &p.steps[1] else {
        panic!()
    };
    assert_eq!(
        *args,
        json!({"driver": "vfio-pci", "id": "cap-dev7-fn1", "host": "0000:3b:00.1", "bus": "rp1", "addr": "0x0"})
    );
    let Step::Device { args, .. } = &p.steps[2] else {
        panic!()
    };
    assert_eq!(args["sysfsdev"], "/sys/devices/x/u");
    let AddressPlan::Vfio { predicted, .. } = &p.address else {
        panic!()
    };
    assert_eq!(predicted[2], Some("0b/00".parse().unwrap()));
    assert!(
        plan(&with_slots(r.clone(), &[0]), &layout(MachineType::Q35))
            .unwrap_err()
            .message
            .contains("needs 3 allocated PCI slot(s), the request carries 1")
    );
    let rm = removal_plan(&r, &layout(MachineType::Q35)).unwrap();
    assert_eq!(
        rm.device_ids(),
        ["cap-dev7", "cap-dev7-fn1", "cap-dev7-fn2"]
    );
}

#[test]
fn nvdimm_plan_and_refusals() {
    let f = disk((4 << 20) + 12345);
    let mut r = req("dev8", DeviceKind::Pmem, f.path().into());
    r.pmem_index = Some(2);
    let p = plan(&r, &layout(MachineType::Pc)).unwrap();
    let Step::Object { id, args } = &p.steps[0] else {
        panic!()
    };
    assert_eq!(id, "cap-dev8-mem");
    assert_eq!(
        *args,
        json!({"qom-type": "memory-backend-file", "id": "cap-dev8-mem", "mem-path": f.path().to_str().unwrap(), "size": 4u64 << 20, "share": true})
    );
    let Step::Device { args, .. } = &p.steps[1] else {
        panic!()
    };
    assert_eq!(
        *args,
        json!({"driver": "nvdimm", "id": "cap-dev8", "memdev": "cap-dev8-mem"})
    );
    assert_eq!(
        p.address,
        AddressPlan::Pmem {
            device: "cap-dev8".into(),
            index: Some(2)
        }
    );
    assert!(p.unplug_unsupported.is_some());
    let rm = removal_plan(&r, &layout(MachineType::Pc)).unwrap();
    assert!(rm.unplug_unsupported.unwrap().contains("not supported"));

    let small = disk(4096);
    let e = plan(
        &req("dev9", DeviceKind::Pmem, small.path().into()),
        &layout(MachineType::Pc),
    )
    .unwrap_err();
    assert!(e.message.contains("smaller"), "{e}");
    let mut no_nvdimm = layout(MachineType::Pc);
    no_nvdimm.nvdimm = false;
    assert_eq!(
        plan(&r, &no_nvdimm).unwrap_err().kind,
        BackendErrorKind::Unsupported
    );
}

#[test]
fn generic_and_bad_ids() {
    let p = plan(
        &req("dev10", DeviceKind::Generic, "/dev/null".into()),
        &layout(MachineType::Pc),
    )
    .unwrap();
    assert!(p.steps.is_empty());
    assert_eq!(p.address, AddressPlan::None);
    let e = plan(
        &req("dev,x", DeviceKind::Generic, "/dev/null".into()),
        &layout(MachineType::Pc),
    )
    .unwrap_err();
    assert!(e.message.contains("dev,x"));
}

#[test]
fn removal_plan_needs_no_host_file() {
    let mut r = req("dev12", DeviceKind::Block, "/gone".into());
    r.driver = Some(BlockDriver::VirtioBlk);
    let rm = removal_plan(&r, &layout(MachineType::Pc)).unwrap();
    assert_eq!(
        rm.steps.iter().map(Step::name).collect::<Vec<_>>(),
        ["cap-dev12-node", "cap-dev12"]
    );
}
