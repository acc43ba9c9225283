//! `cargo bench --bench qmp_roundtrip`: QMP round-trip time of `query-status`
//! against one real QEMU (TCG, no guest), measured side by side in one run:
//! a raw socket (the floor), qbuf-qemu's client, and qapi's own tokio stream
//! (the peer it replaces). Rounds interleave the clients so drift hits all.
//!
//! With `QBUF_BENCH_PYTHON=/venv/bin/python` (a Python that has PyPI's
//! `qemu.qmp`; `tests/bench/run.sh` makes that venv), Python's `qemu.qmp`
//! client is measured too, in the same rounds against the same QEMU, by
//! `tests/bench/qmp_python.py`. `QBUF_BENCH_ROUNDS` overrides the round count.
//! The last line of output, `RESULT calls=… raw_us=… ours_us=… qapi_us=… [python_us=…]`,
//! is for the harness.
//!
//! Why it matters: QEMU reads QMP input one byte per syscall, so request size
//! and client overhead show up in every `status` and in the stop ladder.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ChildStdin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;
const SOCKETS: [&str; 4] = ["a", "b", "c", "d"];
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
    for (i, name) in SOCKETS.iter().enumerate() {
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
    while !SOCKETS.iter().all(|n| q.dir.join(format!("{n}.sock")).exists()) {
        assert!(Instant::now() < end, "QEMU did not create its QMP sockets");
        std::thread::sleep(Duration::from_millis(20));
    }
    q
}

/// Python's `qemu.qmp` client in a child process (see qmp_python.py).
struct Python {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<std::process::ChildStdout>,
}

impl Python {
    fn start(python: &str, sock: &Path) -> Python {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bench/qmp_python.py");
        let mut child = Command::new(python)
            .arg(&script)
            .arg(sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "qmp_python.py did not connect (is qemu.qmp installed for {python}?)");
        Python { child, stdin, out }
    }
    fn batch(&mut self, n: usize) -> Vec<Duration> {
        writeln!(self.stdin, "{n}").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let v: Vec<Duration> = line.split_whitespace().map(|t| Duration::from_nanos(t.parse().unwrap())).collect();
        assert_eq!(v.len(), n, "qmp_python.py answered {line:?}");
        v
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin);
        let _ = self.child.wait();
    }
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
        // One write(2) per request: `writeln!` on the bare socket would issue
        // one per format piece, and QEMU wakes up for each of them.
        let req = format!("{{\"execute\":\"{cmd}\",\"id\":{}}}\n", self.id);
        self.w.write_all(req.as_bytes()).unwrap();
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

    let mut python = std::env::var("QBUF_BENCH_PYTHON").ok().map(|p| Python::start(&p, &qemu.dir.join("d.sock")));
    let rounds = std::env::var("QBUF_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS);

    let (mut t_raw, mut t_ours, mut t_peer, mut t_py) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
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
        if let Some(py) = python.as_mut() {
            t_py.extend(py.batch(PER_ROUND));
        }
    }
    drop(python);
    let us = |v: Vec<Duration>| median(v).as_secs_f64() * 1e6;
    let (raw, ours, peer) = (us(t_raw), us(t_ours), us(t_peer));
    let py = (!t_py.is_empty()).then(|| us(t_py));
    println!("QMP query-status round trip, median of {} calls each, one QEMU, same run:", rounds * PER_ROUND);
    println!("  raw socket (floor)      {raw:>8.1} µs");
    println!("  qbuf-qemu qmp::Qmp      {ours:>8.1} µs  ({:.2}x raw)", ours / raw);
    println!("  qapi QmpStreamTokio     {peer:>8.1} µs  ({:.2}x raw)", peer / raw);
    match py {
        Some(p) => println!("  Python qemu.qmp         {p:>8.1} µs  ({:.2}x raw)", p / raw),
        None => println!("  Python qemu.qmp         not measured (set QBUF_BENCH_PYTHON)"),
    }
    let py_field = py.map(|p| format!(" python_us={p:.1}")).unwrap_or_default();
    println!("RESULT calls={} raw_us={raw:.1} ours_us={ours:.1} qapi_us={peer:.1}{py_field}", rounds * PER_ROUND);
    drop(qemu);
}
