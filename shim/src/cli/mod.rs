//! The `capsule` admin command.
//!
//! ```text
//! capsule [--config FILE] [--state-dir DIR] check
//! capsule [--config FILE] [--state-dir DIR] list [--json]
//! capsule [--config FILE] [--state-dir DIR] inspect SANDBOX [--json]
//! capsule [--config FILE] [--state-dir DIR] cleanup SANDBOX [--force]
//! ```
//!
//! Arguments are parsed by hand (the workspace has no argument parser).
use std::path::PathBuf;

use crate::config::Config;

mod check;
mod inspect;

pub const USAGE: &str = "\
usage: capsule [--config FILE] [--state-dir DIR] COMMAND
commands:
  check                      is this host ready to run capsule sandboxes?
  list [--json]              sandboxes under the state directory
  inspect SANDBOX [--json]   persisted devices and VM of a sandbox, and drift
                             against the devices QEMU really has
  cleanup SANDBOX [--force]  remove a sandbox whose shim is gone (what the
                             shim's delete does); --force also stops a live shim
";

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub command: String,
    pub target: Option<String>,
    pub json: bool,
    pub force: bool,
}

pub fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        config: None,
        state_dir: None,
        command: String::new(),
        target: None,
        json: false,
        force: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--config" | "-c" => a.config = Some(value("--config")?.into()),
            "--state-dir" => a.state_dir = Some(value("--state-dir")?.into()),
            "--json" => a.json = true,
            "--force" => a.force = true,
            "-h" | "--help" | "help" => a.command = "help".into(),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s if a.command.is_empty() => a.command = s.into(),
            s if a.target.is_none() => a.target = Some(s.into()),
            s => return Err(format!("unexpected argument {s}")),
        }
    }
    let needs_target = matches!(a.command.as_str(), "inspect" | "cleanup");
    match a.command.as_str() {
        "" => Err("no command given".into()),
        "check" | "list" if a.target.is_some() => Err(format!("{} takes no argument", a.command)),
        _ if needs_target && a.target.is_none() => Err(format!("{} needs a sandbox id", a.command)),
        "check" | "list" | "inspect" | "cleanup" | "help" => Ok(a),
        other => Err(format!("unknown command {other}")),
    }
}

fn load_config(a: &Args) -> Result<Config, String> {
    let (mut c, _) = Config::load(a.config.as_deref()).map_err(|e| e.to_string())?;
    if let Some(d) = &a.state_dir {
        c.state_dir = d.clone();
    }
    Ok(c)
}

/// Runs the command; returns the exit code.
pub fn main(args: Vec<String>) -> i32 {
    let a = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("capsule: {e}\n{USAGE}");
            return 2;
        }
    };
    if a.command == "help" {
        print!("{USAGE}");
        return 0;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSULE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("capsule: {e}");
            return 1;
        }
    };
    let result = rt.block_on(async {
        match a.command.as_str() {
            "check" => check::run(&a).await,
            "list" => inspect::list(&a, &load_config(&a)?),
            "inspect" => inspect::inspect(&a, &load_config(&a)?).await,
            "cleanup" => inspect::cleanup(&a, &load_config(&a)?).await,
            _ => Err("unreachable".into()),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsule: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Args, String> {
        parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn parses_commands() {
        let a = p("--config /c.toml inspect sb1 --json").unwrap();
        assert_eq!(a.command, "inspect");
        assert_eq!(a.target.as_deref(), Some("sb1"));
        assert!(a.json);
        assert_eq!(a.config, Some("/c.toml".into()));
        assert!(p("cleanup sb1 --force").unwrap().force);
        assert_eq!(
            p("--state-dir /s list").unwrap().state_dir,
            Some("/s".into())
        );
        for bad in [
            "",
            "inspect",
            "cleanup",
            "list x",
            "frob",
            "check --bogus",
            "--config",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
