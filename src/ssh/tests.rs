//! The OpenSSH settings table and its renderings, logins' classification, the user key.
use super::*;

fn target() -> Target {
    Target {
        alias: "qbuf-qemu-dev".into(),
        port: 2222,
        user: "dev".into(),
        key: "/s/ssh/id_ed25519".into(),
        known_hosts: "/s/instances/dev/known_hosts".into(),
        control: Some("/s/instances/dev/ssh-mux".into()),
    }
}

#[test]
fn logins_share_one_connection_when_its_socket_path_fits() {
    let o = target().options().join(" ");
    assert!(o.contains("ControlMaster=auto"), "{o}");
    // One master per guest user: `--ssh-user` changes on a running VM.
    assert!(o.contains("ControlPath=/s/instances/dev/ssh-mux/%r.sock") && o.contains("ControlPersist=yes"), "{o}");
    let pct = Target { control: Some("/s/100%/instances/dev/ssh-mux".into()), ..target() };
    assert!(pct.options().contains(&"ControlPath=/s/100%%/instances/dev/ssh-mux/%r.sock".to_string()));
    let dir = tempfile::tempdir().unwrap();
    for (depth, shared) in [(1, true), (60, false)] {
        let deep = dir.path().join("d".repeat(depth)).join("instances/dev");
        let inst = Instance { name: "dev".into(), dir: deep };
        inst.fresh_ssh_mux_dir().unwrap();
        let t = Target::for_instance(&inst, 2222, "dev", Path::new("/k"));
        assert_eq!(t.control.is_some(), shared, "{:?}: a socket path OpenSSH cannot make is left out", inst.dir);
        assert_eq!(t.options().join(" ").contains("ControlMaster"), shared);
    }
    let none = Instance { name: "old".into(), dir: dir.path().join("old") };
    assert_eq!(Target::for_instance(&none, 2222, "dev", Path::new("/k")).control, None, "no ssh-mux/ yet");
}

#[test]
fn remote_arguments_follow_the_destination_as_given() {
    let argv = target().command(&["cd /mnt/qbuf && make".into(), "-j2".into()]);
    let dest = argv.iter().position(|a| a == "dev@127.0.0.1").unwrap();
    assert_eq!(&argv[dest + 1..], ["cd /mnt/qbuf && make", "-j2"]);
}

#[test]
fn host_keys_are_pinned_per_instance_and_key_only() {
    let o = target().options().join(" ");
    assert!(o.contains("StrictHostKeyChecking=accept-new"));
    assert!(o.contains("UserKnownHostsFile=/s/instances/dev/known_hosts"));
    assert!(o.contains("GlobalKnownHostsFile=/dev/null"));
    assert!(o.contains("PasswordAuthentication=no"));
    assert!(o.contains("GSSAPIAuthentication=no") && o.contains("PreferredAuthentications=publickey"), "{o}");
    assert!(o.contains("IdentitiesOnly=yes"));
    assert!(!o.contains("StrictHostKeyChecking=no"));
    // A dead guest ends a session within seconds, in every rendering.
    assert!(o.contains("ServerAliveInterval=5") && o.contains("ServerAliveCountMax=3"), "{o}");
    let block: Vec<_> = target().config_lines().unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(block.contains(&"ServerAliveInterval") && block.contains(&"ServerAliveCountMax"), "{block:?}");
}

#[test]
fn the_users_agent_and_display_are_not_forwarded_into_the_guest() {
    let t = target();
    let o = t.options().join(" ");
    assert!(o.contains("-o ForwardAgent=no") && o.contains("-o ForwardX11=no"), "{o}");
    let scp = t.scp_command(&[ScpPath::Local("a".into())], &ScpPath::Guest("/b".into()), true, false);
    assert!(scp.contains(&"ForwardAgent=no".to_string()) && scp.contains(&"ForwardX11=no".to_string()));
    let block = t.config_lines().unwrap();
    assert!(block.contains(&("ForwardAgent", "no".into())) && block.contains(&("ForwardX11", "no".into())));
    // As this host's OpenSSH resolves it (`ssh -G`, no connection), against
    // a user config with `Host *` forwarding both.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    fs::write(&config, "Host *\n    ForwardAgent yes\n    ForwardX11 yes\n    LocalForward 8080 localhost:80\n")
        .unwrap();
    let resolved = |user_args: &[&str]| {
        let mut argv = t.command(&user_args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        argv.splice(1..1, ["-F".to_string(), config.display().to_string(), "-G".into()]);
        let out = Command::new(&argv[0]).args(&argv[1..]).stdin(Stdio::null()).output().expect("ssh runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix(' ').map(String::from));
        (get("forwardagent"), get("forwardx11"), get("localforward"))
    };
    let (agent, x11, local) = resolved(&[]);
    assert_eq!((agent.as_deref(), x11.as_deref()), (Some("no"), Some("no")), "the user's config lost");
    assert_eq!(local.as_deref(), Some("8080 [localhost]:80"), "the user's own forwards still apply");
    // `qbuf-qemu ssh -- -A -X`: the user asked for it on the command line.
    let (agent, x11, _) = resolved(&["-A", "-X"]);
    assert_eq!((agent.as_deref(), x11.as_deref()), (Some("yes"), Some("yes")));
    let (agent, ..) = resolved(&["-o", "ForwardAgent=yes"]);
    assert_eq!(agent.as_deref(), Some("no"), "-o after ours does not win (the first value does)");
}

#[test]
fn ssh_scp_and_the_config_block_share_one_set_of_options() {
    let t = Target { known_hosts: "/s s/instances/dev/known_hosts".into(), ..target() };
    let ssh = t.options().join(" ");
    assert!(ssh.starts_with("-i /s/ssh/id_ed25519 -p 2222 -o IdentitiesOnly=yes"), "{ssh}");
    assert!(ssh.contains("UserKnownHostsFile=\"/s s/instances/dev/known_hosts\""), "{ssh}");
    let scp = t.scp_command(&[ScpPath::Local("a b".into())], &ScpPath::Guest("/tmp/x y".into()), false, true);
    assert_eq!(&scp[..3], ["scp", "-r", "-q"]);
    assert!(scp.contains(&"Port=2222".to_string()) && !scp.contains(&"-p".to_string()), "{scp:?}");
    assert_eq!(scp[scp.len() - 2..], ["a b", "dev@127.0.0.1:'/tmp/x y'"], "old scp: the guest's shell reads it");
    let sftp = t.scp_command(&[ScpPath::Guest("/tmp/x y".into())], &ScpPath::Local(".".into()), true, false);
    assert_eq!(sftp[sftp.len() - 2..], ["dev@127.0.0.1:/tmp/x y", "."]);
    let block: Vec<String> = t.config_lines().unwrap().iter().map(|(k, v)| format!("{k} {v}")).collect();
    for (k, _) in t.settings() {
        assert!(block.iter().any(|l| l.starts_with(k)), "{k} missing from {block:?}");
    }
    assert!(block.contains(&"HostKeyAlias qbuf-qemu-dev".to_string()), "{block:?}");
    // Quoted once, in every rendering.
    let kh = "UserKnownHostsFile=\"/s s/instances/dev/known_hosts\"".to_string();
    assert!(scp.contains(&kh), "{scp:?}");
    assert!(block.contains(&"UserKnownHostsFile \"/s s/instances/dev/known_hosts\"".to_string()), "{block:?}");
    assert_eq!(config_value(r#"a"b\c"#), r#""a\"b\\c""#);
    let pct = Target { key: "/s/100%/id".into(), ..target() };
    assert!(pct.options().contains(&"/s/100%%/id".to_string()), "ssh expands % in IdentityFile");
    assert_eq!(openssh_major("OpenSSH_9.2p1 Debian-2+deb12u10, OpenSSL 3.0.19"), Some(9));
    assert_eq!(openssh_major("OpenSSH_8.4p1"), Some(8));
    assert_eq!(openssh_major("Dropbear"), None);
}

#[test]
fn generated_key_is_private_and_its_public_half_derivable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("qbuf-ssh-{}", std::process::id()));
    let state = StateDir::new(dir.clone());
    let k = ensure_user_key(&state).unwrap();
    assert_eq!(fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
    let pub_line = public_key_line(&k).unwrap();
    assert!(pub_line.starts_with("ssh-ed25519 "), "{pub_line}");
    fs::remove_file(k.with_extension("pub")).unwrap();
    assert_eq!(public_key_line(&k).unwrap().split(' ').nth(1), pub_line.split(' ').nth(1));
    assert_eq!(ensure_user_key(&state).unwrap(), k, "generated once");
    check_private_key(&k).unwrap();
    fs::set_permissions(&k, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(check_private_key(&k).unwrap_err().to_string().contains("chmod 600"));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn banner_needs_an_ssh_greeting_not_just_a_connect() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"HTTP/1.0 200 OK\r\n").unwrap();
        let (mut s2, _) = l.accept().unwrap();
        s2.write_all(b"SSH-2.0-dropbear\r\n").unwrap();
    });
    assert_eq!(banner(port, Duration::from_secs(2)), None);
    assert_eq!(banner(port, Duration::from_secs(2)).as_deref(), Some("SSH-2.0-dropbear"));
    t.join().unwrap();
}

#[test]
fn what_the_guest_said_reaches_the_terminal_without_its_controls() {
    use std::os::unix::process::ExitStatusExt;
    let out = |code: i32, stderr: &[u8]| std::process::Output {
        status: std::process::ExitStatus::from_raw(code << 8),
        stdout: vec![],
        stderr: stderr.to_vec(),
    };
    let refused = out(255, b"banner\n\x1b]0;owned\x07dev@127.0.0.1: Permission denied (publickey).\x9b2J\r\n");
    assert_eq!(judge_login(refused), Login::KeyRefused("dev@127.0.0.1: Permission denied (publickey).".into()));
    let failed = out(255, b"kex_exchange_identification: \x1b[6nread: Connection reset\rhidden\n");
    assert_eq!(judge_login(failed), Login::Failed("hidden".into()), "a bare CR ends a line");
    assert_eq!(judge_login(out(255, b"Host key verification failed.\n")), Login::HostKeyChanged);
    // The same words from a guest's shell that ran (another status, or
    // output on stdout) are not OpenSSH's refusal.
    let shell_said = out(1, b"Host key verification failed.\n");
    assert!(matches!(judge_login(shell_said), Login::Failed(_)));
    let mut with_output = out(255, b"Host key verification failed.\n");
    with_output.stdout = b"motd\n".to_vec();
    assert!(matches!(judge_login(with_output), Login::Failed(_)));
    assert!(matches!(judge_login(out(0, b"")), Login::Ok(_)));
    assert_eq!(last_said(&[b'x'; 2000]).len(), 500);
}

#[test]
fn a_path_with_a_newline_cannot_add_a_directive_to_the_users_ssh_config() {
    let key = Target { key: "/s/x\nProxyCommand sh -c evil".into(), ..target() };
    let e = key.config_lines().unwrap_err().to_string();
    assert!(e.contains("IdentityFile \"/s/x\\nProxyCommand sh -c evil\"") && e.contains("--ssh-key"), "{e}");
    assert!(!e.contains('\n'), "the message shows the path escaped: {e}");
    let state = Target { known_hosts: "/s\r/instances/dev/known_hosts".into(), ..target() };
    let e = state.config_lines().unwrap_err().to_string();
    assert!(e.contains("UserKnownHostsFile") && e.contains("--state-dir"), "{e}");
    let mux = Target { control: Some("/s/\x1b[6n/ssh-mux".into()), ..target() };
    assert!(mux.config_lines().unwrap_err().to_string().contains("ControlPath"));
    // Blanks and quotes are quoted, not refused.
    let blank = Target { key: "/s s/\"k\"".into(), ..target() };
    assert!(blank.config_lines().unwrap().contains(&("IdentityFile", r#""/s s/\"k\"""#.into())));
}
