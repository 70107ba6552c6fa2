//! The free page reporting order the kernel command line asks for.
//!
//! virtio-balloon's free page reporting hands pages the guest frees back to
//! the host in blocks of `2^order` pages. Linux 6.1's
//! `page_reporting_register` overwrites the `page_reporting.page_reporting_order`
//! boot parameter with the pageblock order (9: 2 MiB blocks) when the
//! balloon registers, so smaller free blocks stay on the host. The parameter
//! is writable at run time (`/sys/module/page_reporting/parameters/`), so
//! the agent, as PID 1, applies what the command line asked for once the
//! drivers have probed. Fixed upstream in Linux 6.2 (the parameter is only
//! defaulted when unset).
use std::path::Path;

/// The kernel's own boot parameter.
const PARAM: &str = "page_reporting.page_reporting_order=";
/// Where it can be changed at run time.
pub const SYSFS: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
/// Orders beyond this are not a page block size the buddy allocator has.
const MAX_ORDER: u32 = 10;

/// The order the command line asks for (its last occurrence), or why it is
/// refused. `Ok(None)` when it does not ask.
pub fn wanted(cmdline: &str) -> Result<Option<u32>, String> {
    let Some(v) = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(PARAM))
        .next_back()
    else {
        return Ok(None);
    };
    match v.parse::<u32>() {
        Ok(o) if o <= MAX_ORDER => Ok(Some(o)),
        _ => Err(format!(
            "{PARAM}{v:?} is not an order between 0 and {MAX_ORDER}"
        )),
    }
}

/// Applies the command line's order to `sysfs_file` when it differs.
/// Returns what was done, for the log.
pub fn apply(cmdline: &str, sysfs_file: &Path) -> Result<String, String> {
    let Some(want) = wanted(cmdline)? else {
        return Ok("not asked for on the kernel command line".into());
    };
    let now = std::fs::read_to_string(sysfs_file)
        .map_err(|e| format!("{}: {e} (no free page reporting?)", sysfs_file.display()))?;
    let now = now.trim();
    if now == want.to_string() {
        return Ok(format!("order {want} already"));
    }
    std::fs::write(sysfs_file, want.to_string())
        .map_err(|e| format!("writing {want} to {}: {e}", sysfs_file.display()))?;
    Ok(format!("order {want} (the balloon driver had set {now})"))
}

/// PID 1's early init: applies the order `cmdline` asks for, logging the
/// outcome.
pub fn apply_from_cmdline(cmdline: &str) {
    match apply(cmdline, Path::new(SYSFS)) {
        Ok(what) => tracing::info!("free page reporting: {what}"),
        Err(e) => tracing::warn!("free page reporting order not applied: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_occurrence_wins_and_bad_values_are_refused() {
        assert_eq!(wanted("quiet"), Ok(None));
        assert_eq!(
            wanted("page_reporting.page_reporting_order=9 x page_reporting.page_reporting_order=3"),
            Ok(Some(3))
        );
        match wanted("page_reporting.page_reporting_order=eleven") {
            Ok(o) => panic!("\"eleven\" was taken as {o:?}"),
            Err(e) => assert!(e.contains("eleven"), "{e}"),
        }
        assert!(wanted("page_reporting.page_reporting_order=11").is_err());
    }

    #[test]
    fn applies_only_a_different_order() -> Result<(), Box<dyn std::error::Error>> {
        let d = tempfile::tempdir()?;
        let f = d.path().join("page_reporting_order");
        std::fs::write(&f, "9\n")?;
        let cmd = "quiet page_reporting.page_reporting_order=5";
        let did = apply(cmd, &f)?;
        assert!(did.contains("order 5") && did.contains('9'), "{did}");
        assert_eq!(std::fs::read_to_string(&f)?, "5");
        assert_eq!(apply(cmd, &f)?, "order 5 already");
        assert!(apply("quiet", &f)?.contains("not asked"));
        match apply(cmd, &d.path().join("missing")) {
            Ok(did) => panic!("applied to a missing file: {did}"),
            Err(e) => assert!(e.contains("missing"), "{e}"),
        }
        Ok(())
    }
}
