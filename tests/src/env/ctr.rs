//! Commands against an [`Env`]: `ctr` (plain, in a pty, `run`, `exec`,
//! task status and removal) and the `capsule` CLI, all with deadlines.
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Result};

use super::Env;
use crate::{run_with_timeout, text, wait_for, IMAGE, NAMESPACE};

impl Env {
    /// The `ctr` matching this environment's containerd.
    pub fn ctr_path(&self) -> &Path {
        &self.daemon.ctr
    }

    /// `program`, run in the environment's network namespace when it has
    /// one.
    pub fn in_netns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.in_netns(&self.daemon.ctr);
        c.arg("--address")
            .arg(&self.sock)
            .args(["--namespace", NAMESPACE])
            .args(args);
        c
    }

    /// `ctr ARGS` with a 300 s deadline.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        run_with_timeout(self.ctr_cmd(args), Duration::from_secs(300))
    }

    /// `ctr ARGS` that must succeed; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.ctr(args)?;
        if !o.status.success() {
            bail!(
                "ctr {args:?} failed: {}\n{}",
                text(&o),
                self.containerd_log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `ctr run --runtime io.containerd.capsule.v2 OPTS IMAGE ID CMD...`.
    pub fn run(&self, opts: &[&str], id: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["run", "--runtime", self.runtime.as_str()];
        args.extend_from_slice(opts);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// `ctr ... run` under `script`, which gives ctr a terminal (for `-t`).
    pub fn run_in_pty(&self, opts: &[&str], id: &str, cmd: &[&str]) -> Result<Output> {
        let mut words: Vec<String> = vec![
            self.daemon.ctr.display().to_string(),
            "--address".into(),
            self.sock.display().to_string(),
            "--namespace".into(),
            NAMESPACE.into(),
            "run".into(),
            "--runtime".into(),
            self.runtime.clone(),
        ];
        words.extend(opts.iter().map(|s| s.to_string()));
        words.push(IMAGE.into());
        words.push(id.into());
        words.extend(cmd.iter().map(|s| s.to_string()));
        let line = words
            .iter()
            .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("script");
        c.args(["-q", "-e", "-c", &line, "/dev/null"]);
        run_with_timeout(c, Duration::from_secs(300))
    }

    /// The task's status column in `ctr task ls` (None when absent).
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["task", "ls"]).ok()?;
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&id))
            .and_then(|f| f.get(2).map(|s| s.to_string()))
    }

    /// Kills, deletes and removes container `id` (whatever is left of it).
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let _ = wait_for("the task to stop", Duration::from_secs(30), || {
            match self.task_status(id).as_deref() {
                None | Some("STOPPED") => Some(()),
                _ => None,
            }
        });
        let _ = self.ctr(&["task", "delete", id]);
        let _ = self.ctr(&["container", "delete", id]);
    }

    /// `capsule --config <ours> ARGS`.
    pub fn capsule(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new(&self.capsule_cli);
        c.arg("--config").arg(&self.config_path).args(args);
        run_with_timeout(c, Duration::from_secs(120))
    }

    /// A shell snippet's output inside a running container.
    pub fn exec(&self, id: &str, exec_id: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }
}
