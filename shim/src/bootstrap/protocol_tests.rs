use super::*;
use crate::service::options::config_path;

/// `ctr run --runtime-config-path /tmp/ctrd-probe/cfg.toml` as containerd
/// 1.6.20, 1.7.24 and 2.1.9 all piped it to `start` (captured with a shim
/// that dumped its stdin): `Any { type_url = "runtimeoptions.v1.Options",
/// value = Options { config_path = "/tmp/ctrd-probe/cfg.toml" } }`.
const CAPTURED_OPTIONS: &[u8] =
    b"\x0a\x19runtimeoptions.v1.Options\x12\x1a\x12\x18/tmp/ctrd-probe/cfg.toml";

/// A length-delimited field, encoded by hand.
fn ld(field: u8, bytes: &[u8]) -> Vec<u8> {
    assert!(bytes.len() < 128 && field < 16);
    let mut v = vec![(field << 3) | 2, bytes.len() as u8];
    v.extend_from_slice(bytes);
    v
}

/// `BootstrapParams` as containerd 2.3's `core/runtime/v2/command.go` fills
/// it for `ctr run --runtime-config-path …`, encoded from the field numbers
/// of api/runtime/bootstrap/v1/bootstrap.proto (not with the generated code).
fn bootstrap_bytes(id: &str, namespace: &str) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(ld(1, id.as_bytes())); // instance_id
    v.extend(ld(2, namespace.as_bytes())); // namespace
                                           // log_level = LOG_LEVEL_DEBUG (-4): an int32 enum, sign-extended to a
                                           // ten-byte varint.
    v.extend([
        0x18, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ]);
    v.extend(ld(4, b"2.3.0")); // containerd_version
    v.extend(ld(5, b"/run/containerd/containerd.sock.ttrpc"));
    v.extend(ld(6, b"/run/containerd/containerd.sock"));
    v.extend(ld(7, b"/usr/bin/containerd")); // containerd_binary
    v.extend(ld(8, &ld(1, CAPTURED_OPTIONS))); // extensions { value = options }
    v.extend(ld(9, b"/run/containerd/s")); // socket_dir
    v
}

#[test]
fn empty_stdin() {
    assert_eq!(decode_start_input(b"", "c1", "ns"), StartInput::Empty);
}

#[test]
fn runtime_options_as_containerd_1_x_and_2_0_to_2_2_send_them() {
    let input = decode_start_input(CAPTURED_OPTIONS, "c1", "ns");
    let StartInput::RuntimeOptions(any) = &input else {
        panic!("{input:?}");
    };
    assert_eq!(any.type_url, "runtimeoptions.v1.Options");
    assert_eq!(
        config_path(any),
        Some("/tmp/ctrd-probe/cfg.toml".into()),
        "{any:?}"
    );
    assert_eq!(input.options().len(), 1);
}

#[test]
fn bootstrap_params_as_containerd_2_3_sends_them() {
    let bytes = bootstrap_bytes("c1", "ns");
    let input = decode_start_input(&bytes, "c1", "ns");
    let StartInput::Bootstrap(p) = &input else {
        panic!("{input:?}");
    };
    assert_eq!(p.containerd_version, "2.3.0");
    assert_eq!(
        p.containerd_ttrpc_address,
        "/run/containerd/containerd.sock.ttrpc"
    );
    assert_eq!(p.containerd_grpc_address, "/run/containerd/containerd.sock");
    assert_eq!(p.containerd_binary, "/usr/bin/containerd");
    assert_eq!(p.socket_dir.as_deref(), Some("/run/containerd/s"));
    assert_eq!(p.log_level.value(), -4);
    let options = input.options();
    assert_eq!(options.len(), 1);
    assert_eq!(
        config_path(&options[0]),
        Some("/tmp/ctrd-probe/cfg.toml".into())
    );
    assert_eq!(
        daemon(&input, Some("2")),
        Daemon::Bootstrap {
            containerd_version: "2.3.0".into()
        }
    );
}

#[test]
fn the_two_encodings_decode_as_each_other_and_are_told_apart() {
    // Runtime options decode as BootstrapParams: type URL → instance_id,
    // options bytes → namespace.
    let as_params = BootstrapParams::parse_from_bytes(CAPTURED_OPTIONS).unwrap();
    assert_eq!(as_params.instance_id, "runtimeoptions.v1.Options");
    // …yet even a container named like the type URL, in a namespace named
    // like the options, does not make them bootstrap params: no field 5.
    let ns = as_params.namespace.clone();
    assert!(matches!(
        decode_start_input(CAPTURED_OPTIONS, "runtimeoptions.v1.Options", &ns),
        StartInput::RuntimeOptions(_)
    ));
    // BootstrapParams decode as an Any: id → type URL, namespace → value.
    let bytes = bootstrap_bytes("c1", "ns");
    let as_any = Any::parse_from_bytes(&bytes).unwrap();
    assert_eq!(as_any.type_url, "c1");
    assert_eq!(as_any.value, b"ns");
    // Params for another container or namespace are not ours: read as
    // (foreign, ignored) options, and answered in a form 2.3 reads too.
    for (id, ns) in [("c2", "ns"), ("c1", "other")] {
        let input = decode_start_input(&bytes, id, ns);
        assert!(matches!(input, StartInput::RuntimeOptions(_)), "{input:?}");
        assert_eq!(config_path(&input.options()[0]), None);
        assert_eq!(
            daemon(&input, Some("2")).reply(Role::Task),
            Reply::Json { version: 2 }
        );
    }
    // An extension without a type URL is not what containerd sends.
    let mut untyped = bootstrap_bytes("c1", "ns");
    untyped.extend(ld(8, &ld(1, &ld(2, b"x"))));
    assert!(!matches!(
        decode_start_input(&untyped, "c1", "ns"),
        StartInput::Bootstrap(_)
    ));
}

#[test]
fn garbage_is_ignored() {
    for bytes in [
        &b"\xff\xfe garbage"[..],
        b"\x0a\x03abc\x12\x02st\xff\xfe",
        b"{}",
    ] {
        let input = decode_start_input(bytes, "c1", "ns");
        assert!(input.options().iter().all(|a| config_path(a).is_none()));
        assert!(!matches!(input, StartInput::Bootstrap(_)), "{input:?}");
    }
}

#[test]
fn each_daemon_gets_the_reply_it_reads() {
    let addr = "unix:///run/containerd/s/ab";
    // containerd 1.6: no MAX_SHIM_VERSION.
    let d = daemon(&StartInput::Empty, None);
    assert_eq!(d, Daemon::Containerd16);
    assert_eq!(
        encode_reply(d.reply(Role::Task), addr).unwrap(),
        addr.as_bytes()
    );
    // containerd 1.7 and 2.0–2.2: MAX_SHIM_VERSION=2.
    let d = daemon(&StartInput::Empty, Some("2"));
    assert_eq!(d.reply(Role::Task), Reply::Json { version: 2 });
    let json: serde_json::Value =
        serde_json::from_slice(&encode_reply(d.reply(Role::Task), addr).unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"version": 2, "address": addr, "protocol": "ttrpc"})
    );
    // Never above what capsule serves, nor below 2 in JSON.
    assert_eq!(
        daemon(&StartInput::Empty, Some("3")).reply(Role::Task),
        Reply::Json { version: 2 }
    );
    assert_eq!(
        daemon(&StartInput::Empty, Some("1")).reply(Role::Task),
        Reply::Bare
    );
    assert_eq!(
        daemon(&StartInput::Empty, Some("x")).reply(Role::Task),
        Reply::Bare
    );
    // containerd 2.3: BootstrapResult { version = 2; address; protocol }.
    let input = decode_start_input(&bootstrap_bytes("c1", "ns"), "c1", "ns");
    let bytes = encode_reply(daemon(&input, Some("2")).reply(Role::Task), addr).unwrap();
    let mut want = vec![0x08, 0x02];
    want.extend(ld(2, addr.as_bytes()));
    want.extend(ld(3, b"ttrpc"));
    assert_eq!(bytes, want);
}

#[test]
fn the_shim_sandbox_controllers_bundles_are_sandboxes() {
    use std::path::Path;
    for (bundle, role) in [
        // containerd 2.x, sandboxer = "shim" (default state directory and a
        // private one).
        (
            "/run/containerd/io.containerd.sandbox.controller.v1.shim/k8s.io/4f0c",
            Role::Sandbox,
        ),
        (
            "/tmp/cap-x/state/io.containerd.sandbox.controller.v1.shim/default/pod",
            Role::Sandbox,
        ),
        // Tasks: podsandbox pods, ctr; containerd 1.7's controller.
        (
            "/run/containerd/io.containerd.runtime.v2.task/k8s.io/4f0c",
            Role::Task,
        ),
        (
            "/run/containerd/io.containerd.sandbox.controller.v1.local/k8s.io/4f0c",
            Role::Task,
        ),
        ("/io.containerd.sandbox.controller.v1.shim", Role::Task),
        ("relative", Role::Task),
    ] {
        assert_eq!(role_of(Path::new(bundle)), role, "{bundle}");
    }
}

#[test]
fn a_sandbox_gets_version_3_from_containerd_2() {
    let addr = "unix:///run/containerd/s/ab";
    // 2.0–2.2 say MAX_SHIM_VERSION=2 but read version 3.
    let d = daemon(&StartInput::Empty, Some("2"));
    assert_eq!(d.reply(Role::Sandbox), Reply::Json { version: 3 });
    let json: serde_json::Value =
        serde_json::from_slice(&encode_reply(d.reply(Role::Sandbox), addr).unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"version": 3, "address": addr, "protocol": "ttrpc"})
    );
    // 2.3: BootstrapResult { version = 3 }.
    let input = decode_start_input(&bootstrap_bytes("pod", "ns"), "pod", "ns");
    let bytes = encode_reply(daemon(&input, Some("2")).reply(Role::Sandbox), addr).unwrap();
    assert_eq!(&bytes[..2], &[0x08, 0x03]);
    // A daemon that reads no JSON gets the address, whatever the role.
    assert_eq!(
        daemon(&StartInput::Empty, None).reply(Role::Sandbox),
        Reply::Bare
    );
}
