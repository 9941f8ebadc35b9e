//! A wire with a delay, in user space: this kernel has no netem, so a WAN's one-way delay is
//! made by a process that sits between two interfaces (in a namespace of its own, with no
//! addresses) and copies every Ethernet frame from one to the other, each direction after
//! the same delay. Frames keep their order; the delay can be changed while it runs.
//!
//! Frames are read and written with Linux packet sockets (`AF_PACKET`, `SOCK_RAW`) with a
//! virtio-net header (`PACKET_VNET_HDR`): a veth hands over TCP's 64 KiB segmentation-offload
//! frames and checksums left to the hardware, and the header carries both across unchanged,
//! so the forwarder neither needs `ethtool` to turn offloads off nor breaks checksums.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The largest frame we copy: a 64 KiB offload frame, its Ethernet header and the 10-byte
/// virtio-net header, with room to spare. A longer one is dropped, as a wire drops a giant.
const FRAME_BUFFER: usize = 128 * 1024;

/// How many frames one direction holds at most (a router's queue): beyond it, new frames are
/// dropped (the senders' congestion control sees a loss, as on a full link).
const QUEUE_FRAMES: usize = 20_000;

/// A packet socket bound to one interface, reading everything that arrives on it.
fn packet_socket(interface: &str) -> io::Result<OwnedFd> {
    let name = CString::new(interface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name with NUL"))?;
    // SAFETY: a C string that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {interface} here"),
        ));
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all as libc::c_int) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    for option in [libc::PACKET_VNET_HDR, libc::PACKET_IGNORE_OUTGOING] {
        // SAFETY: an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                option,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = all;
    address.sll_ifindex = index as i32;
    // SAFETY: the address is a sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// One direction's frames in flight: each with the moment it may leave.
struct InFlight {
    frames: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    arrived: Condvar,
}

/// Copy frames from `from` to `to`, each `delay` (microseconds, read per frame) after it
/// arrived. Runs until a socket fails.
fn direction(from: OwnedFd, to: OwnedFd, delay: Arc<AtomicU64>) -> io::Result<()> {
    let line = Arc::new(InFlight {
        frames: Mutex::new(VecDeque::new()),
        arrived: Condvar::new(),
    });
    let sending = line.clone();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        loop {
            let (due, frame) = {
                let mut frames = sending.frames.lock().unwrap();
                loop {
                    if let Some(next) = frames.pop_front() {
                        break next;
                    }
                    frames = sending.arrived.wait(frames).unwrap();
                }
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // SAFETY: a buffer of the length given.
            let r = unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if r < 0 {
                let e = io::Error::last_os_error();
                // A frame the other side cannot take (down for a moment, too big) is lost,
                // as on a wire; anything else ends the forwarder.
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ENOBUFS | libc::EMSGSIZE | libc::ENETDOWN | libc::ENXIO)
                ) {
                    return Err(e);
                }
            }
        }
    });
    let mut buffer = vec![0u8; FRAME_BUFFER];
    loop {
        // SAFETY: a buffer of the length given.
        let n = unsafe {
            libc::recv(
                from.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n > buffer.len() {
            continue;
        }
        let due = Instant::now() + Duration::from_micros(delay.load(Ordering::Relaxed));
        let mut frames = line.frames.lock().unwrap();
        if frames.len() < QUEUE_FRAMES {
            frames.push_back((due, buffer[..n].to_vec()));
            line.arrived.notify_one();
        }
        drop(frames);
        if sender.is_finished() {
            return match sender.join() {
                Ok(result) => result,
                Err(_) => Err(io::Error::other("the sending thread panicked")),
            };
        }
    }
}

/// Join interfaces `a` and `b` (in this process's network namespace) with a wire whose
/// one-way delay is `delay` microseconds in each direction. Returns once both sockets are
/// bound (so no frame sent after it is lost); the copying runs on threads of its own until
/// the process ends.
pub fn join(a: &str, b: &str, delay: Arc<AtomicU64>) -> io::Result<()> {
    let (a_in, b_in) = (packet_socket(a)?, packet_socket(b)?);
    let (a_out, b_out) = (a_in.try_clone()?, b_in.try_clone()?);
    for (from, to, name) in [
        (a_in, b_out, format!("{a}->{b}")),
        (b_in, a_out, format!("{b}->{a}")),
    ] {
        let delay = delay.clone();
        std::thread::spawn(move || {
            if let Err(e) = direction(from, to, delay) {
                eprintln!("delay link {name} stopped: {e}");
                std::process::exit(1);
            }
        });
    }
    Ok(())
}
