//! Whether an instance runs, judged one way for every command from the
//! instance lock (held for a VM's whole life, by its launch and then its
//! supervisor), the supervisor's control socket, and the two processes
//! `run.json` names (a zombie is not running).

use anyhow::Result;

use super::records::{read_json, RunRecord};
use super::{Instance, Lock};
use crate::timeouts::DYING;

/// What runs of an instance, as one probe tells it.
#[derive(Debug, Clone)]
pub enum Liveness {
    /// Nothing: the lock is free (or was let go within a moment because
    /// QEMU and its supervisor have both ended).
    Stopped,
    /// The supervisor serves the VM: its control socket is there and QEMU
    /// runs.
    Supervised(RunRecord),
    /// QEMU runs without its supervisor (it was killed): QEMU's own QMP
    /// socket is the way to stop it.
    Orphaned(RunRecord),
    /// The lock is held with no VM to reach: a launch is starting it, a
    /// stop finishing with it, or another command holds the instance.
    Busy,
}

impl Liveness {
    pub fn probe(inst: &Instance) -> Result<Liveness> {
        if !Lock::is_held(inst)? {
            return Ok(Liveness::Stopped);
        }
        let run: Option<RunRecord> = read_json(&inst.run_record())?;
        let Some(run) = run else { return Ok(Liveness::Busy) };
        Ok(match (run.qemu.is_running(), run.supervisor.is_running()) {
            (true, true) if inst.control().exists() => Liveness::Supervised(run),
            (true, false) => Liveness::Orphaned(run),
            (false, false) if Lock::wait_released(inst, DYING)? => Liveness::Stopped,
            _ => Liveness::Busy,
        })
    }

    /// The record of a QEMU that runs (supervised or not).
    pub fn running(&self) -> Option<&RunRecord> {
        match self {
            Liveness::Supervised(r) | Liveness::Orphaned(r) => Some(r),
            Liveness::Stopped | Liveness::Busy => None,
        }
    }

    /// Whether anything holds the instance.
    pub fn is_stopped(&self) -> bool {
        matches!(self, Liveness::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::proc::ProcIdentity;
    use crate::instance::write_json;
    use crate::qemu::args::Accel;

    fn record(qemu: &ProcIdentity, supervisor: &ProcIdentity) -> RunRecord {
        RunRecord {
            qemu: qemu.clone(),
            supervisor: supervisor.clone(),
            started_at: 0.0,
            accel: Accel::Tcg,
            qemu_version: "10.0.0".into(),
            argv: vec![],
        }
    }

    /// Each answer from the same files a real instance has: the lock held
    /// by this process, run.json naming this process (running) or an
    /// identity that no process has (ended), and the control socket's file.
    #[test]
    fn one_probe_tells_stopped_busy_supervised_and_orphaned_apart() {
        let dir = std::env::temp_dir().join(format!("qbuf-liveness-{}", std::process::id()));
        let inst = Instance { name: "t".into(), dir: dir.clone() };
        inst.ensure_dir().unwrap();
        let alive = ProcIdentity::of(std::process::id() as i32).unwrap();
        let ended = ProcIdentity { start_ticks: alive.start_ticks + 1, ..alive.clone() };
        assert!(Liveness::probe(&inst).unwrap().is_stopped());

        let lock = Lock::try_acquire(&inst).unwrap().expect("free");
        assert!(matches!(Liveness::probe(&inst).unwrap(), Liveness::Busy), "held, no run.json: starting");
        write_json(&inst.run_record(), &record(&alive, &alive)).unwrap();
        assert!(matches!(Liveness::probe(&inst).unwrap(), Liveness::Busy), "no control socket yet");
        std::fs::write(inst.control(), "").unwrap();
        let live = Liveness::probe(&inst).unwrap();
        assert!(matches!(live, Liveness::Supervised(_)) && live.running().is_some(), "{live:?}");
        write_json(&inst.run_record(), &record(&alive, &ended)).unwrap();
        assert!(matches!(Liveness::probe(&inst).unwrap(), Liveness::Orphaned(_)));
        write_json(&inst.run_record(), &record(&ended, &alive)).unwrap();
        assert!(matches!(Liveness::probe(&inst).unwrap(), Liveness::Busy), "QEMU ended, supervisor finishing");
        drop(lock);
        assert!(Liveness::probe(&inst).unwrap().is_stopped());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
