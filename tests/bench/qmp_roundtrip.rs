//! `cargo bench --bench qmp_roundtrip`: QMP round-trip time of `query-status`
//! against one real QEMU (TCG, no guest), measured side by side in one run:
//! a raw socket (the floor), qbuf-qemu's client, and qapi's own tokio stream
//! (the peer it replaces). Rounds interleave the clients so drift hits all.
//!
//! Why it matters: QEMU reads QMP input one byte per syscall, so request size
//! and client overhead show up in every `status` and in the stop ladder.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const PER_ROUND: usize = 400;

struct Qemu {
    child: Child,
    dir: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_qemu() -> Qemu {
    let dir = std::env::temp_dir().join(format!("qbuf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut args: Vec<String> = "-nodefaults -no-user-config -display none -machine q35 -accel tcg -m 64M -S"
        .split(' ')
        .map(String::from)
        .collect();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        args.push("-chardev".into());
        args.push(format!("socket,id=m{i},path={}/{name}.sock,server=on,wait=off", dir.display()));
        args.push("-mon".into());
        args.push(format!("chardev=m{i},mode=control"));
    }
    let child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (tests/setup.sh)");
    let q = Qemu { child, dir };
    let end = Instant::now() + Duration::from_secs(20);
    while !["a", "b", "c"].iter().all(|n| q.dir.join(format!("{n}.sock")).exists()) {
        assert!(Instant::now() < end, "QEMU did not create its QMP sockets");
        std::thread::sleep(Duration::from_millis(20));
    }
    q
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
    id: u64,
}

impl Raw {
    fn open(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let mut raw = Raw { w: s, r, id: 0 };
        raw.call("qmp_capabilities");
        raw
    }
    fn call(&mut self, cmd: &str) {
        self.id += 1;
        writeln!(self.w, "{{\"execute\":\"{cmd}\",\"id\":{}}}", self.id).unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if line.contains("\"id\"") {
                return;
            }
        }
    }
}

fn main() {
    let qemu = start_qemu();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut raw = Raw::open(&qemu.dir.join("a.sock"));
    let ours = rt
        .block_on(qbuf_qemu::qmp::Qmp::connect(&qemu.dir.join("b.sock"), Duration::from_secs(5)))
        .expect("qbuf-qemu QMP client connects");
    let (peer, _events) = rt.block_on(async {
        let s = qapi::futures::QmpStreamTokio::open_uds(qemu.dir.join("c.sock")).await.unwrap();
        let s = s.negotiate().await.unwrap();
        s.spawn_tokio()
    });

    let (mut t_raw, mut t_ours, mut t_peer) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            let t = Instant::now();
            raw.call("query-status");
            t_raw.push(t.elapsed());
        }
        rt.block_on(async {
            for _ in 0..PER_ROUND {
                let t = Instant::now();
                ours.execute(&qapi::qmp::query_status {}, Duration::from_secs(5)).await.unwrap();
                t_ours.push(t.elapsed());
            }
            for _ in 0..PER_ROUND {
                let t = Instant::now();
                peer.execute(qapi::qmp::query_status {}).await.unwrap();
                t_peer.push(t.elapsed());
            }
        });
    }
    println!("QMP query-status round trip, median of {} calls each, one QEMU, same run:", ROUNDS * PER_ROUND);
    println!("  raw socket (floor)      {:>8.1} µs", median(t_raw).as_secs_f64() * 1e6);
    println!("  qbuf-qemu qmp::Qmp      {:>8.1} µs", median(t_ours).as_secs_f64() * 1e6);
    println!("  qapi QmpStreamTokio     {:>8.1} µs", median(t_peer).as_secs_f64() * 1e6);
    drop(qemu);
}
