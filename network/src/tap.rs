//! Tap devices for the VM: the name capsule gives the tap beside a link,
//! and opening its queues with `TUNSETIFF` (run inside the namespace).
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Longest interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// The most queues a tap takes (the kernel's MAX_TAP_QUEUES).
pub const MAX_QUEUES: u32 = 256;

/// The tap capsule makes beside `link`: `cap_<link>`, or for names longer
/// than 11 bytes `cap_` + the first 7 bytes + 4 hex digits of a hash of
/// the whole name (so two long names that share a prefix do not collide).
pub fn tap_name(link: &str) -> String {
    const PREFIX: &str = "cap_";
    if PREFIX.len() + link.len() <= IFNAME_MAX {
        return format!("{PREFIX}{link}");
    }
    let mut cut = 7;
    while !link.is_char_boundary(cut) {
        cut -= 1;
    }
    // FNV-1a, folded to 16 bits.
    let mut h: u32 = 0x811c_9dc5;
    for b in link.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let h16 = (h >> 16) ^ (h & 0xffff);
    format!("{PREFIX}{}{h16:04x}", &link[..cut])
}

/// Opens `queues` queues of a new tap `name` (`IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` when `queues > 1`). The first
/// open has `IFF_TUN_EXCL`: it fails with EBUSY rather than attach to a
/// tap that already exists. The tap is not persistent: it disappears when
/// the last queue is closed. Must run inside the target namespace.
pub(crate) fn open_queues(name: &str, queues: u32) -> io::Result<Vec<OwnedFd>> {
    if name.is_empty() || name.len() > IFNAME_MAX || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?} is not a valid interface name"),
        ));
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if queues > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut fds = Vec::with_capacity(queues as usize);
    for q in 0..queues {
        let f = if q == 0 {
            flags | libc::IFF_TUN_EXCL
        } else {
            flags
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("open /dev/net/tun: {e}")))?;
        set_iff(&file, name, f).map_err(|e| {
            io::Error::new(e.kind(), format!("tap {name:?} queue {q}: TUNSETIFF: {e}"))
        })?;
        fds.push(OwnedFd::from(file));
    }
    Ok(fds)
}

fn set_iff(file: &impl AsRawFd, name: &str, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // The flags are a short in the kernel ABI; IFF_TUN_EXCL is its top bit.
    req.ifr_ifru.ifru_flags = flags as u16 as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is, and the descriptor is open on /dev/net/tun.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_differ() {
        assert_eq!(tap_name("eth0"), "cap_eth0");
        assert_eq!(tap_name("abcdefghijk"), "cap_abcdefghijk");
        let a = tap_name("verylongname1");
        let b = tap_name("verylongname2");
        assert_ne!(a, b);
        for n in [&a, &b] {
            assert_eq!(n.len(), IFNAME_MAX, "{n}");
            assert!(n.starts_with("cap_verylon"), "{n}");
        }
        // Multi-byte characters are not split.
        let u = tap_name("ééééééééé");
        assert!(u.len() <= IFNAME_MAX, "{u}");
    }
}
