use super::*;

fn d() -> Defaults {
    Defaults { share: Some("/src/qbuf".into()) }
}

#[test]
fn a_run_from_a_snapshot_inherits_the_source_settings_unless_given() {
    let (src, _) = merge(
        None,
        &LaunchFlags {
            ssh_user: Some("root".into()),
            ssh_key: Some("/k".into()),
            share_mode: Some(ShareMode::Ro),
            share_type: Some(ShareType::NineP),
            ..Default::default()
        },
        &d(),
    )
    .unwrap();
    let mut f = LaunchFlags::default();
    inherit(&mut f, &src);
    assert_eq!((f.ssh_user.as_deref(), f.ssh_key.as_deref()), (Some("root"), Some(Path::new("/k"))));
    assert_eq!((f.share_mode, f.share_type), (Some(ShareMode::Ro), Some(ShareType::NineP)));
    let mut f = LaunchFlags { ssh_user: Some("dev".into()), share_mode: Some(ShareMode::Rw), ..Default::default() };
    inherit(&mut f, &src);
    assert_eq!((f.ssh_user.as_deref(), f.share_mode), (Some("dev"), Some(ShareMode::Rw)), "flags win");
}

#[test]
fn first_launch_uses_defaults() {
    let (s, ch) = merge(None, &LaunchFlags { image: Some("/i.qcow2".into()), ..Default::default() }, &d()).unwrap();
    assert_eq!(s.memory_mib, 4096);
    assert_eq!(s.ssh_port, DEFAULT_SSH_PORT);
    assert_eq!(s.share, Some("/src/qbuf".into()));
    assert_eq!(s.ssh_user, "dev");
    assert_eq!(s.source, Source::Image { path: "/i.qcow2".into() });
    assert!(ch.is_empty());
}

#[test]
fn plain_launch_reuses_saved_settings_and_flags_are_reported_as_changes() {
    let f = LaunchFlags { image: Some("/i.qcow2".into()), memory: Some(1024), no_share: true, ..Default::default() };
    let (saved, _) = merge(None, &f, &d()).unwrap();
    let (again, ch) = merge(Some(&saved), &LaunchFlags::default(), &d()).unwrap();
    assert_eq!(again, saved);
    assert!(ch.is_empty());
    let (changed, ch) = merge(Some(&saved), &LaunchFlags { cpus: Some(4), ..Default::default() }, &d()).unwrap();
    assert_eq!(changed.cpus, 4);
    assert_eq!(ch, vec![Change { setting: "cpus", from: "2".into(), to: "4".into() }]);
    assert_eq!(changed.share, None, "a saved --no-share is kept");
}

#[test]
fn auto_port_is_kept_once_picked() {
    let (s, _) = merge(None, &LaunchFlags { ssh_port: Some(PortChoice::Auto), ..Default::default() }, &d()).unwrap();
    assert_eq!(s.ssh_port, 0, "caller picks");
    let saved = Settings { ssh_port: 40000, ..s };
    let (s2, ch) =
        merge(Some(&saved), &LaunchFlags { ssh_port: Some(PortChoice::Auto), ..Default::default() }, &d()).unwrap();
    assert_eq!(s2.ssh_port, 40000);
    assert!(ch.is_empty());
}

#[test]
fn contradictions_are_refused_with_the_fix() {
    let e =
        merge(None, &LaunchFlags { share: Some("/x".into()), no_share: true, ..Default::default() }, &d()).unwrap_err();
    assert!(e.to_string().contains("give one"));
    let e = merge(None, &LaunchFlags { kernel: Some("/k".into()), ..Default::default() }, &d()).unwrap_err();
    assert!(e.to_string().contains("--initrd"));
    let e = merge(None, &LaunchFlags { append: Some("x".into()), ..Default::default() }, &d()).unwrap_err();
    assert!(e.to_string().contains("--kernel"));
    assert!("0".parse::<PortChoice>().is_err());
    assert!("70000".parse::<PortChoice>().unwrap_err().contains("auto"));
}

#[test]
fn each_setting_remembers_where_it_came_from() {
    let first = LaunchFlags { memory: Some(1024), ssh_port: Some(PortChoice::Auto), ..Default::default() };
    let (s, _) = merge(None, &first, &d()).unwrap();
    let o = &s.origins;
    assert_eq!((o.memory, o.cpus, o.ssh_port), (Some(Origin::Flag), Some(Origin::Default), Some(Origin::Auto)));
    assert_eq!(o.share, Some(Origin::Checkout), "the checkout launch ran in");
    let (again, _) = merge(Some(&s), &LaunchFlags { cpus: Some(1), ..Default::default() }, &d()).unwrap();
    assert_eq!((again.origins.memory, again.origins.cpus), (Some(Origin::Flag), Some(Origin::Flag)));
    // Settings saved before origins were recorded: unknown, not invented.
    let old: Settings = serde_json::from_value({
        let mut v = serde_json::to_value(&s).unwrap();
        v.as_object_mut().unwrap().remove("origins");
        v
    })
    .unwrap();
    let (kept, ch) = merge(Some(&old), &LaunchFlags::default(), &d()).unwrap();
    assert_eq!(kept.origins, Origins::default());
    assert!(ch.is_empty());
}

#[test]
fn paths_normalize_without_touching_the_disk() {
    assert_eq!(normalize(Path::new("/a/b/../c/./d")), PathBuf::from("/a/c/d"));
    assert_eq!(normalize(Path::new("/src/docs/..")), PathBuf::from("/src"));
}

#[test]
fn a_new_kernel_keeps_the_saved_command_line() {
    let f = LaunchFlags {
        kernel: Some("/k".into()),
        initrd: Some("/i".into()),
        append: Some("console=ttyS0".into()),
        ..Default::default()
    };
    let (s, _) = merge(None, &f, &d()).unwrap();
    let again = LaunchFlags { kernel: Some("/k2".into()), initrd: Some("/i2".into()), ..Default::default() };
    let (s2, _) = merge(Some(&s), &again, &d()).unwrap();
    assert!(matches!(s2.source, Source::Kernel { append: Some(ref a), .. } if a == "console=ttyS0"), "{:?}", s2.source);
}

#[test]
fn a_guix_source_keeps_what_was_not_given() {
    let f = LaunchFlags { guix_dir: Some("/g".into()), image_size: Some("40G".into()), ..Default::default() };
    let (s, _) = merge(None, &f, &d()).unwrap();
    let dir_only = LaunchFlags { guix_dir: Some("/g2".into()), ..Default::default() };
    let (s2, _) = merge(Some(&s), &dir_only, &d()).unwrap();
    assert_eq!(s2.source, Source::Guix { guix_dir: Some("/g2".into()), image_size: "40G".into() });
    let size_only = LaunchFlags { image_size: Some("50G".into()), ..Default::default() };
    let (s3, _) = merge(Some(&s), &size_only, &d()).unwrap();
    assert_eq!(s3.source, Source::Guix { guix_dir: Some("/g".into()), image_size: "50G".into() });
}

#[test]
fn kernel_boot_keeps_its_disk_and_append() {
    let f = LaunchFlags {
        kernel: Some("/k".into()),
        initrd: Some("/i".into()),
        append: Some("console=ttyS0".into()),
        image: Some("/d.qcow2".into()),
        ..Default::default()
    };
    let (s, _) = merge(None, &f, &d()).unwrap();
    let (s2, ch) = merge(Some(&s), &LaunchFlags::default(), &d()).unwrap();
    assert_eq!(s2.source, s.source);
    assert!(ch.is_empty());
}
