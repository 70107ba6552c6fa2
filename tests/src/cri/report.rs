//! The suite's report: one table per runtime, and the verdict (what makes
//! the test fail).
use std::fmt::Write;
use std::time::Duration;

use super::suite::{Outcome, Runtime, Status};

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// A markdown table of `runtime`'s outcomes.
pub fn table(outcomes: &[Outcome], runtime: Runtime) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "| case | result | time | detail |");
    let _ = writeln!(t, "|---|---|---|---|");
    for o in outcomes.iter().filter(|o| o.runtime == runtime) {
        let (result, failure) = match &o.status {
            Status::Pass => ("pass", None),
            Status::Fail(e) => ("FAIL", Some(e.clone())),
            Status::NotApplicable(why) => ("n/a", Some(why.clone())),
        };
        let mut parts = Vec::new();
        if let (Some(d), Runtime::Capsule) = (o.expected_difference, runtime) {
            parts.push(format!("expected difference ({d})"));
        }
        parts.extend(failure);
        parts.extend(o.notes.iter().cloned());
        let detail = parts.join("; ");
        let _ = writeln!(
            t,
            "| {} | {} | {:.1} s | {} |",
            o.case,
            result,
            o.elapsed.as_secs_f64(),
            cell(&detail)
        );
    }
    let total: Duration = outcomes
        .iter()
        .filter(|o| o.runtime == runtime)
        .map(|o| o.elapsed)
        .sum();
    let _ = writeln!(t, "\ntotal {:.0} s", total.as_secs_f64());
    t
}

/// What fails the suite: a case that fails on the control (runc: the case
/// or the environment is broken), and a case that passes on runc but fails
/// on capsule (for an expected difference, the capsule side of the case
/// asserts the refusal, so a failure there means capsule did not refuse
/// fast with the reason).
pub fn verdict(outcomes: &[Outcome]) -> Vec<String> {
    let mut problems = Vec::new();
    for o in outcomes {
        let Status::Fail(e) = &o.status else {
            continue;
        };
        match o.runtime {
            Runtime::Runc => problems.push(format!("{}: fails on runc (control): {e}", o.case)),
            Runtime::Capsule => {
                let runc = outcomes
                    .iter()
                    .find(|r| r.runtime == Runtime::Runc && r.case == o.case);
                match runc.map(|r| &r.status) {
                    Some(Status::Pass) => {
                        problems.push(format!("{}: passes on runc, fails on capsule: {e}", o.case))
                    }
                    None => {
                        problems.push(format!("{}: fails on capsule (runc not run): {e}", o.case))
                    }
                    _ => {}
                }
            }
        }
    }
    problems
}
