//! Property tests over every parser of outside text: QMP lines, HMP's
//! `info usernet`, QEMU's version line, qcow2 headers, the supervisor's
//! control protocol, the settings files, `/proc/PID/stat`, and the command
//! line's values. The property is the same for all: any input, valid or
//! hostile, gives an answer or an error, never a panic. Run length and
//! corpus size are recorded in docs/architecture.md ("Fuzzing").

use proptest::prelude::*;

/// Cases per property; `PROPTEST_CASES` overrides it for a longer run.
fn config() -> ProptestConfig {
    ProptestConfig { cases: 2000, ..ProptestConfig::default() }
}

/// Text that looks like JSON often enough to reach the parsers' inner paths.
fn jsonish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\{\"(return|error|event|id|timestamp|QMP|class|desc|data)\": ?(\\{.{0,40}\\}|[0-9-]{1,20}|\"[^\"]{0,20}\"|null|true|\\[.{0,20}\\])(, ?\"(id|event|data|timestamp)\": ?.{0,30})?\\}\r?\n?",
        "\\{\"(op|answer)\": ?\"(qmp|status|powerdown|subscribe|return|qmp-error|failed|stopped|event)\"(, ?\"(body|command|timeout_ms|timeout_secs|force|arguments)\": ?.{0,40})?\\}",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn qmp_lines_never_panic(line in jsonish()) {
        let _ = crate::qmp::classify(&line);
    }

    #[test]
    fn usernet_text_never_panics(text in "((Hub|VLAN) -?[0-9]+ \\([a-z0-9]{0,5}\\):|  (TCP|UDP|ICMP)\\[[A-Z_]{0,14}\\] +[0-9*]{0,3} +[0-9.*]{0,15} +[0-9-]{0,6} +[0-9.*]{0,15} +[0-9-]{0,6} +[0-9]{0,3} +[0-9]{0,3}|.{0,60})(\r?\n.{0,80}){0,6}") {
        let _ = crate::qemu::parse::parse_usernet(&text);
        let _ = crate::qemu::parse::live_forwards(&text);
    }

    #[test]
    fn version_lines_never_panic(line in "(QEMU emulator version )?[0-9.a-z ()+~-]{0,40}") {
        let _ = crate::qemu::parse::parse_qemu_version(&line);
    }

    #[test]
    fn qmp_json_replies_never_panic(text in jsonish()) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let _ = crate::qemu::parse::parse_query_block(&v);
            let _ = crate::qemu::parse::port_has_device(&v);
            let _ = crate::qemu::parse::block_node_names(&v);
            let _ = crate::qemu::parse::peripheral_ids(&v);
            let _ = crate::qemu::parse::MigrationProgress::of_query_migrate(&v);
        }
    }

    #[test]
    fn qcow2_headers_never_panic(mut head in proptest::collection::vec(any::<u8>(), 0..600), magic in any::<bool>(), version in 0u32..5) {
        if magic && head.len() >= 8 {
            head[..4].copy_from_slice(b"QFI\xfb");
            head[4..8].copy_from_slice(&version.to_be_bytes());
        }
        let _ = crate::qemu::image::inspect_header(&head);
    }

    #[test]
    fn control_protocol_lines_never_panic(line in jsonish()) {
        let _ = serde_json::from_str::<crate::supervisor::protocol::Request>(&line);
        let _ = serde_json::from_str::<crate::supervisor::protocol::Response>(&line);
    }

    #[test]
    fn settings_files_never_panic(text in prop_oneof![any::<String>(), "\\{\"(memory_mib|cpus|ssh_port|share|source|accel|ssh_user)\": ?.{0,40}\\}"]) {
        let _ = serde_json::from_str::<crate::config::Settings>(&text);
        let _ = serde_json::from_str::<crate::instance::records::DevicesRecord>(&text);
        let _ = serde_json::from_str::<crate::instance::records::StopRecord>(&text);
    }

    #[test]
    fn proc_stat_lines_never_panic(line in "[0-9]{0,6} \\(.{0,20}\\)( [A-Z]( [0-9-]{1,20}){0,25})?") {
        let _ = crate::instance::proc::parse_stat(&line);
    }

    #[test]
    fn command_line_values_never_panic(v in prop_oneof![any::<String>(), "[0-9.]{0,25}[a-zA-Z]{0,4}", "([0-9.]{0,16}:)?[0-9]{0,6}(:[0-9]{0,6})?(/[a-z]{0,4})?"]) {
        use crate::cli::parse;
        let _ = parse::size_bytes(&v);
        let _ = parse::memory_mib(&v);
        let _ = parse::disk_bytes(&v);
        let _ = parse::image_size(&v);
        let _ = parse::cpus(&v);
        let _ = parse::timeout(&v);
        let _ = parse::parse_forward(&v);
        let _ = parse::parse_host_end(&v);
        let _ = parse::name(&v);
        let _ = parse::disk_id(&v);
        let _ = parse::existing_disk_id(&v);
        let _ = parse::share_tag(&v);
        let _ = parse::snapshot_name(&v);
    }

    #[test]
    fn events_with_any_data_never_panic(name in "[A-Z_]{1,20}", data in jsonish()) {
        let data = serde_json::from_str(&data).unwrap_or(serde_json::Value::Null);
        let ev = crate::qmp::Event { event: name, data, timestamp: 1.0 };
        let _ = ev.shutdown();
        let mut state =
            crate::supervisor::protocol::VmState::new(1, 0.0, crate::qemu::args::Accel::Tcg, "", 4);
        crate::supervisor::dispatcher::note_event(&mut state, &ev);
    }
}
