//! The task/process state machine.
//!
//! ```text
//!   Created ─start─▶ Starting ─started─▶ Running ─pause─▶ Pausing ─paused─▶ Paused
//!      ▲                │                 ▲  ▲               │                 │
//!      └──start-failed──┘                 │  └─pause-failed──┘              resume
//!                                         │                                    ▼
//!                                         └───────────resumed──────────── Resuming
//!                                                  (resume-failed: back to Paused)
//!   every live state ──exit──▶ Stopped
//!   Created, Stopped ──delete──▶ Deleting ──deleted──▶ Deleted
//! ```
//!
//! Every change goes through [`Status::apply`], one total function, which
//! refuses the others with an error containerd understands
//! (`FAILED_PRECONDITION`, or `NOT_FOUND` for a process that is gone). An
//! operation that awaits (the agent, the devices) holds a transitional
//! state (`Starting`, `Pausing`, `Resuming`, `Deleting`) across the await,
//! so a concurrent call of the same kind is refused instead of passing the
//! same check. An exit may arrive during a transitional state: the process
//! is then `Stopped`, and the operation's completion leaves it so.
use containerd_shim_protos::types::task::Status as ApiStatus;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Starting,
    Running,
    Pausing,
    Paused,
    Resuming,
    Stopped,
    Deleting,
    Deleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    /// The agent started the process.
    Started,
    /// The agent could not start it.
    StartFailed,
    Pause,
    /// The guest paused it.
    PauseDone,
    PauseFailed,
    Resume,
    /// The guest resumed it.
    ResumeDone,
    ResumeFailed,
    /// The process exited (or the VM died).
    Exit,
    Delete,
    /// Everything of it is gone.
    DeleteDone,
    /// Sending a signal: allowed while the process exists; no change.
    Kill,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Started | Op::StartFailed => "finish starting",
            Op::Pause => "pause",
            Op::PauseDone | Op::PauseFailed => "finish pausing",
            Op::Resume => "resume",
            Op::ResumeDone | Op::ResumeFailed => "finish resuming",
            Op::Exit => "record the exit of",
            Op::Delete => "delete",
            Op::DeleteDone => "finish deleting",
            Op::Kill => "signal",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Pausing => "pausing",
            Status::Paused => "paused",
            Status::Resuming => "resuming",
            Status::Stopped => "stopped",
            Status::Deleting => "deleting",
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
            (Created, Start) => Starting,
            (Starting, Started) => Running,
            (Starting, StartFailed) => Created,
            (Running, Pause) => Pausing,
            (Pausing, PauseDone) => Paused,
            (Pausing, PauseFailed) => Running,
            (Paused, Resume) => Resuming,
            (Resuming, ResumeDone) => Running,
            (Resuming, ResumeFailed) => Paused,
            // An exit during an operation wins; its completion changes
            // nothing.
            (
                Stopped,
                Started | StartFailed | PauseDone | PauseFailed | ResumeDone | ResumeFailed,
            ) => Stopped,
            (Created | Starting | Running | Pausing | Paused | Resuming, Exit) => Stopped,
            (Stopped, Exit) => Stopped,
            (Deleting, Exit) => Deleting,
            (Created | Stopped, Delete) => Deleting,
            (Deleting, DeleteDone) => Deleted,
            (Created | Starting | Running | Pausing | Paused | Resuming, Kill) => self,
            (Stopped | Deleting, Kill) => {
                return Err(Error::not_found(format!(
                    "{what}: process already finished"
                )))
            }
            (Deleted, _) => return Err(Error::not_found(format!("{what}: deleted"))),
            (Starting | Pausing | Resuming | Deleting, _) => {
                return Err(Error::precondition(format!(
                    "{what}: cannot {} a process that is {self}; try again",
                    op.verb()
                )))
            }
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
            Status::Created | Status::Starting => ApiStatus::CREATED,
            Status::Running | Status::Pausing => ApiStatus::RUNNING,
            Status::Paused | Status::Resuming => ApiStatus::PAUSED,
            Status::Stopped | Status::Deleting | Status::Deleted => ApiStatus::STOPPED,
        }
    }

    /// The process may still run.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Status::Created
                | Status::Starting
                | Status::Running
                | Status::Pausing
                | Status::Paused
                | Status::Resuming
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use Op::*;
    use Status::*;

    const ALL: [Status; 9] = [
        Created, Starting, Running, Pausing, Paused, Resuming, Stopped, Deleting, Deleted,
    ];
    const OPS: [Op; 13] = [
        Start,
        Started,
        StartFailed,
        Pause,
        PauseDone,
        PauseFailed,
        Resume,
        ResumeDone,
        ResumeFailed,
        Exit,
        Delete,
        DeleteDone,
        Kill,
    ];

    #[test]
    fn allowed_transitions_and_nothing_else() {
        let ok = [
            (Created, Start, Starting),
            (Starting, Started, Running),
            (Starting, StartFailed, Created),
            (Running, Pause, Pausing),
            (Pausing, PauseDone, Paused),
            (Pausing, PauseFailed, Running),
            (Paused, Resume, Resuming),
            (Resuming, ResumeDone, Running),
            (Resuming, ResumeFailed, Paused),
            (Stopped, Started, Stopped),
            (Stopped, StartFailed, Stopped),
            (Stopped, PauseDone, Stopped),
            (Stopped, PauseFailed, Stopped),
            (Stopped, ResumeDone, Stopped),
            (Stopped, ResumeFailed, Stopped),
            (Created, Exit, Stopped),
            (Starting, Exit, Stopped),
            (Running, Exit, Stopped),
            (Pausing, Exit, Stopped),
            (Paused, Exit, Stopped),
            (Resuming, Exit, Stopped),
            (Stopped, Exit, Stopped),
            (Deleting, Exit, Deleting),
            (Created, Delete, Deleting),
            (Stopped, Delete, Deleting),
            (Deleting, DeleteDone, Deleted),
            (Created, Kill, Created),
            (Starting, Kill, Starting),
            (Running, Kill, Running),
            (Pausing, Kill, Pausing),
            (Paused, Kill, Paused),
            (Resuming, Kill, Resuming),
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
                        assert!(e.to_string().starts_with("container c1: "), "{e}");
                        assert!(
                            matches!(e.kind(), Kind::FailedPrecondition | Kind::NotFound),
                            "{s:?} {op:?}: {e:?}"
                        );
                    }
                    (w, g) => panic!("{s:?} {op:?}: want {w:?}, got {g:?}"),
                }
            }
        }
    }

    #[test]
    fn a_second_start_is_refused_while_the_first_awaits() {
        let s = Created.apply(Start, "container c1").unwrap();
        let e = s.apply(Start, "container c1").unwrap_err();
        assert_eq!(e.kind(), Kind::FailedPrecondition);
        assert!(e.to_string().contains("that is starting"), "{e}");
        let e = Deleting.apply(Delete, "container c1").unwrap_err();
        assert!(e.to_string().contains("that is deleting"), "{e}");
    }

    #[test]
    fn messages_and_codes() {
        let e = Stopped.apply(Kill, "exec e1").unwrap_err();
        assert_eq!(e.kind(), Kind::NotFound);
        assert!(e.to_string().contains("already finished"));
        let e = Running.apply(Delete, "container c1").unwrap_err();
        assert_eq!(e.kind(), Kind::FailedPrecondition);
        assert!(e.to_string().contains("kill it first"), "{e}");
        let e = Stopped.apply(Start, "container c1").unwrap_err();
        assert!(
            e.to_string().contains("cannot start a stopped process"),
            "{e}"
        );
        assert_eq!(Paused.to_api(), ApiStatus::PAUSED);
        assert_eq!(Starting.to_api(), ApiStatus::CREATED);
    }
}
