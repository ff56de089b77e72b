//! Stem cells: instances started before their function is known, which get their code
//! later (OpenWhisk's idea). The host and the outer init talk over [`crate::init::INIT_FD`],
//! a `SOCK_SEQPACKET` pair (one message per request, so a message and the fd it carries
//! arrive together and never merge with the next):
//!
//! ```text
//! host -> init   'C' + SCM_RIGHTS[detached mount]   attach it at /var/task (once)
//! host -> init   'T' + u64 BE                       remount /tmp with this size
//! init -> host   'K'                                done
//! init -> host   'E' + UTF-8 reason                 refused or failed; discard the instance
//! ```
//!
//! (Before those, an egress instance's init says `U` and waits for the host's `G`.)
//!
//! The host clones the code directory itself (`open_tree(OPEN_TREE_CLONE)`) and makes
//! the clone read-only, nosuid, nodev and private (`mount_setattr`) while it is still
//! detached; init only attaches it (`move_mount`). Cloning must happen on the host's
//! side: the kernel refuses to clone a mount of another mount namespace, but a detached
//! clone may be attached in any namespace its holder administers. Init sits in the
//! instance's mount namespace with the instance's root (pivot_root moved it along with
//! the program), outside the program's pid namespace, so the program can neither see it
//! nor reach the socket.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::spec::TASK_DIR;

/// Request kinds and replies on the init socket.
pub(crate) const REQ_CODE: u8 = b'C';
pub(crate) const REQ_TMP: u8 = b'T';
pub(crate) const REP_OK: u8 = b'K';
pub(crate) const REP_ERR: u8 = b'E';

/// Largest message either side sends (an error reason is cut to fit).
const MAX_MESSAGE: usize = 1024;

// The mount API's ABI (linux/mount.h), spelled out because not every libc release
// exports it.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn last_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn open_tree(dir: &Path, flags: libc::c_uint) -> Result<OwnedFd, String> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| format!("code dir {} contains NUL", dir.display()))?;
    // SAFETY: open_tree reads the NUL-terminated path, which outlives the call; it
    // returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(last_err(&format!("clone {}", dir.display())));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn mount_setattr(tree: BorrowedFd, attr: &MountAttr) -> Result<(), String> {
    // SAFETY: the empty path and `attr` outlive the call; the kernel reads
    // size_of::<MountAttr>() bytes of `attr` (MOUNT_ATTR_SIZE_VER0) and writes nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(last_err("make the code mount read-only"));
    }
    Ok(())
}

/// Host side: a detached, read-only, nosuid, nodev, private clone of `dir` (its own
/// mount only, not what is mounted below it), ready to be attached by init.
pub(crate) fn detached_code_tree(dir: &Path) -> Result<OwnedFd, String> {
    if !dir.is_absolute() {
        return Err(format!("code dir {} must be absolute", dir.display()));
    }
    let tree = open_tree(dir, OPEN_TREE_CLONE)?;
    let st = nix::sys::stat::fstat(tree.as_raw_fd())
        .map_err(|e| format!("stat {}: {e}", dir.display()))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(format!("code dir {} is not a directory", dir.display()));
    }
    mount_setattr(
        tree.as_fd(),
        &MountAttr {
            attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            // The clone of a shared mount joins its peer group; the code must not
            // receive (or send) mount events.
            propagation: libc::MS_PRIVATE,
            userns_fd: 0,
        },
    )?;
    Ok(tree)
}

/// Whether this kernel has what stem cells need (open_tree, mount_setattr: Linux 5.12).
pub(crate) fn supported() -> bool {
    open_tree(Path::new("/"), OPEN_TREE_CLONE).is_ok_and(|t| {
        mount_setattr(
            t.as_fd(),
            &MountAttr {
                attr_set: MOUNT_ATTR_NOSUID,
                attr_clr: 0,
                propagation: libc::MS_PRIVATE,
                userns_fd: 0,
            },
        )
        .is_ok()
    })
}

/// Init side: attaches the host's detached clone at [`TASK_DIR`] of init's root, which
/// is the instance's root.
pub(crate) fn attach_code(tree: BorrowedFd) -> Result<(), String> {
    let target = CString::new(TASK_DIR).map_err(|e| e.to_string())?;
    // SAFETY: both paths are NUL-terminated and outlive the call; integers otherwise.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(last_err(&format!("mount the code at {TASK_DIR}")));
    }
    Ok(())
}

/// Init side: changes the size (and inode cap) of the instance's `/tmp`, and of
/// `/dev/shm` in proportion (refused by the kernel when more than that is in use).
pub(crate) fn resize_tmp(bytes: u64) -> Result<(), String> {
    use crate::rootfs::{scratch_options, shm_bytes};
    use nix::mount::{MsFlags, mount};
    // A remount resets the mount's flags to those given: keep each mount's own.
    let nosuid_nodev = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for (path, size, flags) in [
        ("/tmp", bytes, nosuid_nodev),
        (
            "/dev/shm",
            shm_bytes(bytes),
            nosuid_nodev | MsFlags::MS_NOEXEC,
        ),
    ] {
        mount(
            None::<&str>,
            path,
            Some("tmpfs"),
            flags,
            Some(scratch_options(size).as_str()),
        )
        .map_err(|e| format!("resize {path} to {size} bytes: {e}"))?;
    }
    Ok(())
}

/// One request as init received it.
pub(crate) enum Request {
    Code(OwnedFd),
    Tmp(u64),
    /// Anything else; the reason is the reply.
    Invalid(String),
}

/// Parses a request message and the fds that came with it (all of which it owns, so
/// surplus ones are closed).
pub(crate) fn parse_request(msg: &[u8], mut fds: Vec<OwnedFd>) -> Request {
    match (msg.first(), msg.len()) {
        (Some(&REQ_CODE), 1) if fds.len() == 1 => fds.pop().map_or_else(
            || Request::Invalid("code request without a mount".into()),
            Request::Code,
        ),
        (Some(&REQ_CODE), 1) => {
            Request::Invalid(format!("code request with {} fds, expected 1", fds.len()))
        }
        (Some(&REQ_TMP), 9) => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[1..9]);
            Request::Tmp(u64::from_be_bytes(b))
        }
        (Some(k), _) => Request::Invalid(format!("unknown request {:?}", char::from(*k))),
        (None, _) => Request::Invalid("empty request".into()),
    }
}

/// `K`, or `E` + the reason cut to [`MAX_MESSAGE`] at a character boundary.
pub(crate) fn reply(r: &Result<(), String>) -> Vec<u8> {
    match r {
        Ok(()) => vec![REP_OK],
        Err(why) => {
            let mut end = why.len().min(MAX_MESSAGE - 1);
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            let mut v = Vec::with_capacity(end + 1);
            v.push(REP_ERR);
            v.extend_from_slice(&why.as_bytes()[..end]);
            v
        }
    }
}

/// One message and the descriptors that came with it.
pub(crate) type Message = (Vec<u8>, Vec<OwnedFd>);

/// Receives one message; `Ok(None)` when the peer is gone.
pub(crate) fn recv(sock: BorrowedFd) -> Result<Option<Message>, Errno> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let r = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match r {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these descriptors for us.
                    fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                }
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return Ok(None);
        }
        return Ok(Some((buf[..n].to_vec(), fds)));
    }
}

/// Sends one message, with `fd` attached if given.
pub(crate) fn send(sock: BorrowedFd, msg: &[u8], fd: Option<BorrowedFd>) -> Result<(), Errno> {
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage> = raw
        .as_ref()
        .map(|r| ControlMessage::ScmRights(r))
        .into_iter()
        .collect();
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[std::io::IoSlice::new(msg)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Host side: one request and its reply within `timeout`. `Err(Transport)` means the
/// channel can no longer be trusted (a late reply could answer the next request).
pub(crate) fn request(
    sock: BorrowedFd,
    msg: &[u8],
    fd: Option<BorrowedFd>,
    timeout: Duration,
) -> Result<(), RequestError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    send(sock, msg, fd).map_err(|e| RequestError::Transport(format!("send to init: {e}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::Transport(
                "init did not answer in time".into(),
            ));
        }
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(RequestError::Transport(format!("wait for init: {e}"))),
        }
    }
    match recv(sock) {
        Ok(Some((m, _))) if m.first() == Some(&REP_OK) => Ok(()),
        Ok(Some((m, _))) if m.first() == Some(&REP_ERR) => Err(RequestError::Refused(
            String::from_utf8_lossy(&m[1..]).into_owned(),
        )),
        Ok(Some(_)) => Err(RequestError::Transport(
            "init sent a malformed reply".into(),
        )),
        Ok(None) => Err(RequestError::Transport("init exited".into())),
        Err(e) => Err(RequestError::Transport(format!("read init's reply: {e}"))),
    }
}

#[derive(Debug)]
pub(crate) enum RequestError {
    /// Init answered `E`.
    Refused(String),
    /// The channel broke or timed out.
    Transport(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Refused(m) | RequestError::Transport(m) => f.write_str(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    fn devnull() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").expect("open"))
    }

    #[test]
    fn parses_requests_and_refuses_the_rest() {
        assert!(matches!(
            parse_request(b"C", vec![devnull()]),
            Request::Code(_)
        ));
        assert!(matches!(
            parse_request(b"C", vec![]),
            Request::Invalid(m) if m.contains("0 fds")
        ));
        assert!(matches!(
            parse_request(b"C", vec![devnull(), devnull()]),
            Request::Invalid(m) if m.contains("2 fds")
        ));
        let mut t = vec![REQ_TMP];
        t.extend_from_slice(&(64u64 << 20).to_be_bytes());
        assert!(matches!(parse_request(&t, vec![]), Request::Tmp(n) if n == 64 << 20));
        assert!(matches!(
            parse_request(&t[..5], vec![]),
            Request::Invalid(_)
        ));
        assert!(matches!(parse_request(b"", vec![]), Request::Invalid(_)));
        assert!(matches!(
            parse_request(b"Z", vec![]),
            Request::Invalid(m) if m.contains("'Z'")
        ));
    }

    #[test]
    fn replies_are_cut_at_a_char_boundary() {
        assert_eq!(reply(&Ok(())), b"K");
        let long = "é".repeat(MAX_MESSAGE);
        let r = reply(&Err(long));
        assert_eq!(r[0], REP_ERR);
        assert!(r.len() <= MAX_MESSAGE);
        std::str::from_utf8(&r[1..]).expect("valid UTF-8 after cutting");
    }

    #[test]
    fn request_round_trip_with_an_fd() {
        let (host, init) = pair();
        let t = std::thread::spawn(move || {
            let (msg, fds) = recv(init.as_fd()).expect("recv").expect("message");
            let r = match parse_request(&msg, fds) {
                Request::Code(fd) => {
                    // The fd arrived and is close-on-exec in the receiver.
                    let flags =
                        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::F_GETFD).expect("fcntl");
                    assert!(flags & libc::FD_CLOEXEC != 0);
                    Err("refused for the test".to_string())
                }
                _ => Ok(()),
            };
            send(init.as_fd(), &reply(&r), None).expect("reply");
            // The second request goes unanswered: the peer closes.
            let _ = recv(init.as_fd());
        });
        let f = devnull();
        match request(host.as_fd(), b"C", Some(f.as_fd()), Duration::from_secs(5)) {
            Err(RequestError::Refused(m)) => assert_eq!(m, "refused for the test"),
            other => panic!("{other:?}"),
        }
        let err = request(host.as_fd(), b"T", None, Duration::from_secs(5));
        t.join().expect("thread");
        assert!(matches!(err, Err(RequestError::Transport(m)) if m == "init exited"));
    }

    #[test]
    fn request_times_out_as_a_transport_error() {
        let (host, _init) = pair();
        let r = request(host.as_fd(), b"T", None, Duration::from_millis(20));
        assert!(matches!(r, Err(RequestError::Transport(m)) if m.contains("in time")));
    }

    #[test]
    fn code_tree_needs_an_existing_absolute_directory() {
        assert!(detached_code_tree(Path::new("relative")).is_err());
        // Whether or not we may clone mounts here, a missing dir is an error.
        let err = detached_code_tree(Path::new("/does/not/exist/nimbus")).expect_err("missing");
        assert!(err.contains("/does/not/exist/nimbus"), "{err}");
    }
}
