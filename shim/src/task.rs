//! The task/process state machine.
//!
//! ```text
//!   Created ──start──▶ Running ──pause──▶ Paused
//!      │                 │  ▲──resume──────┘ │
//!      │ exit            │ exit              │ exit
//!      ▼                 ▼                   ▼
//!   Stopped ◀────────────┴───────────────────┘
//!      │ delete (also from Created)
//!      ▼
//!   Deleted
//! ```
//!
//! Every change goes through [`Status::apply`], which refuses the others
//! with an error containerd understands (`FAILED_PRECONDITION`, or
//! `NOT_FOUND` for a process that is gone).
use containerd_shim_protos::types::task::Status as ApiStatus;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
    Deleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Pause,
    Resume,
    /// The process exited (or the VM died).
    Exit,
    Delete,
    /// Sending a signal: allowed while the process exists; no change.
    Kill,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Exit => "record the exit of",
            Op::Delete => "delete",
            Op::Kill => "signal",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
            Status::Deleted => "deleted",
        })
    }
}

impl Status {
    /// The state after `op`, or why `op` is not allowed now. `what` names
    /// the process in the error (`container c1`, `exec e1 of c1`).
    pub fn apply(self, op: Op, what: &str) -> Result<Status> {
        use Op::*;
        use Status::*;
        let next = match (self, op) {
            (Created, Start) => Running,
            (Running, Pause) => Paused,
            (Paused, Resume) => Running,
            (Created | Running | Paused, Exit) => Stopped,
            (Created | Stopped, Delete) => Deleted,
            (Created | Running | Paused, Kill) => self,
            (Stopped, Kill) => {
                return Err(Error::not_found(format!(
                    "{what}: process already finished"
                )))
            }
            (Deleted, _) => return Err(Error::not_found(format!("{what}: deleted"))),
            (Running | Paused, Delete) => {
                return Err(Error::precondition(format!(
                    "{what}: cannot delete a {self} process; kill it first"
                )))
            }
            (s, op) => {
                return Err(Error::precondition(format!(
                    "{what}: cannot {} a {s} process",
                    op.verb()
                )))
            }
        };
        Ok(next)
    }

    pub fn to_api(self) -> ApiStatus {
        match self {
            Status::Created => ApiStatus::CREATED,
            Status::Running => ApiStatus::RUNNING,
            Status::Paused => ApiStatus::PAUSED,
            Status::Stopped | Status::Deleted => ApiStatus::STOPPED,
        }
    }

    pub fn is_live(self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::Paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use Op::*;
    use Status::*;

    const ALL: [Status; 5] = [Created, Running, Paused, Stopped, Deleted];
    const OPS: [Op; 6] = [Start, Pause, Resume, Exit, Delete, Kill];

    #[test]
    fn allowed_transitions() {
        let ok = [
            (Created, Start, Running),
            (Running, Pause, Paused),
            (Paused, Resume, Running),
            (Created, Exit, Stopped),
            (Running, Exit, Stopped),
            (Paused, Exit, Stopped),
            (Created, Delete, Deleted),
            (Stopped, Delete, Deleted),
            (Created, Kill, Created),
            (Running, Kill, Running),
            (Paused, Kill, Paused),
        ];
        for s in ALL {
            for op in OPS {
                let want = ok
                    .iter()
                    .find(|(from, o, _)| *from == s && *o == op)
                    .map(|t| t.2);
                let got = s.apply(op, "container c1");
                match (want, got) {
                    (Some(w), Ok(g)) => assert_eq!(w, g, "{s:?} {op:?}"),
                    (None, Err(e)) => {
                        assert!(e.message.starts_with("container c1: "), "{e}");
                        assert!(
                            matches!(e.kind, Kind::FailedPrecondition | Kind::NotFound),
                            "{s:?} {op:?}: {e:?}"
                        );
                    }
                    (w, g) => panic!("{s:?} {op:?}: want {w:?}, got {g:?}"),
                }
            }
        }
    }

    #[test]
    fn messages_and_codes() {
        let e = Stopped.apply(Kill, "exec e1").unwrap_err();
        assert_eq!(e.kind, Kind::NotFound);
        assert!(e.message.contains("already finished"));
        let e = Running.apply(Delete, "container c1").unwrap_err();
        assert_eq!(e.kind, Kind::FailedPrecondition);
        assert!(e.message.contains("kill it first"), "{e}");
        let e = Stopped.apply(Start, "container c1").unwrap_err();
        assert!(e.message.contains("cannot start a stopped process"), "{e}");
        assert_eq!(Paused.to_api(), ApiStatus::PAUSED);
    }
}
