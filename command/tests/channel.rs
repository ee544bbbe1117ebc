//! The worker channel between two real processes: descriptors cross, messages keep their
//! boundaries, and no error path leaks a descriptor.
//!
//! Runs without the test harness: descriptor counts of /proc/self/fd are only meaningful when
//! no other test runs concurrently in the same process. The same binary is the child process,
//! selected by an environment variable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rampart_command::channel::{Channel, ChannelError, MAX_FDS};
use rampart_command::proto::{
    self, SupervisorToKeyring, SupervisorToWorker, WorkerToSupervisor, supervisor_to_keyring, supervisor_to_worker,
    worker_to_supervisor,
};

const CHILD_FD_VAR: &str = "RAMPART_TEST_CHANNEL_FD";

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn log(message: &str) -> WorkerToSupervisor {
    WorkerToSupervisor {
        kind: Some(worker_to_supervisor::Kind::Log(proto::LogLine {
            level: 3,
            target: "test".into(),
            message: message.into(),
        })),
    }
}

fn listener_handoff() -> SupervisorToWorker {
    SupervisorToWorker {
        kind: Some(supervisor_to_worker::Kind::Listener(proto::ListenerHandoff {
            address: "127.0.0.1:1".into(),
            protocol: 0,
        })),
    }
}

/// The child: receives a pipe's write end, writes through it, answers with its own pipe's read end.
fn child(fd: i32) {
    // SAFETY: the parent handed us this descriptor number and nothing else in this process owns it.
    let channel = Channel::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let received = channel.recv::<SupervisorToWorker>().unwrap().expect("a message");
    assert!(matches!(
        received.message.kind,
        Some(supervisor_to_worker::Kind::Listener(_))
    ));
    let mut out = std::fs::File::from(received.fds.into_iter().next().unwrap());
    out.write_all(b"written by the child").unwrap();
    drop(out);

    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let mut w = std::fs::File::from(write_end);
    w.write_all(b"from the child's pipe").unwrap();
    drop(w);
    channel.send(&listener_handoff(), &[read_end.as_fd()]).unwrap();
    channel.send(&log("bye"), &[]).unwrap();
}

fn main() {
    if let Ok(fd) = std::env::var(CHILD_FD_VAR) {
        child(fd.parse().unwrap());
        return;
    }
    let mut passed = 0;
    let tests: [(&str, fn()); 6] = [
        (
            "descriptors_cross_between_processes",
            descriptors_cross_between_processes,
        ),
        (
            "unexpected_descriptors_are_refused_and_closed",
            unexpected_descriptors_are_refused_and_closed,
        ),
        (
            "too_many_descriptors_is_ctrunc_and_nothing_leaks",
            too_many_descriptors_is_ctrunc_and_nothing_leaks,
        ),
        ("garbage_and_close_are_typed", garbage_and_close_are_typed),
        ("a_large_order_travels_in_pieces", a_large_order_travels_in_pieces),
        (
            "a_wrong_direction_message_is_refused",
            a_wrong_direction_message_is_refused,
        ),
    ];
    for (name, test) in tests {
        test();
        println!("test {name} ... ok");
        passed += 1;
    }
    println!("test result: ok. {passed} passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
}

fn descriptors_cross_between_processes() {
    let before = open_fds();
    let (parent, child_end) = Channel::pair().unwrap();
    let child_raw = child_end.as_raw_fd();
    let mut child = unsafe {
        Command::new(std::env::current_exe().unwrap())
            .env(CHILD_FD_VAR, child_raw.to_string())
            // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on the one descriptor
            // the child must inherit.
            .pre_exec(move || {
                if libc::fcntl(child_raw, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
            .spawn()
            .unwrap()
    };
    drop(child_end);

    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    parent.send(&listener_handoff(), &[write_end.as_fd()]).unwrap();
    drop(write_end);
    let mut text = String::new();
    std::fs::File::from(read_end).read_to_string(&mut text).unwrap();
    assert_eq!(text, "written by the child");

    let answer = parent.recv::<SupervisorToWorker>().unwrap().unwrap();
    assert_eq!(answer.fds.len(), 1);
    let mut text = String::new();
    std::fs::File::from(answer.fds.into_iter().next().unwrap())
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "from the child's pipe");
    let bye = parent.recv::<WorkerToSupervisor>().unwrap().unwrap();
    assert!(matches!(bye.message.kind, Some(worker_to_supervisor::Kind::Log(l)) if l.message == "bye"));
    assert!(child.wait().unwrap().success());
    // The child is gone: the channel reports the close.
    assert!(parent.recv::<WorkerToSupervisor>().unwrap().is_none());
    drop(parent);
    assert_eq!(open_fds(), before, "descriptors leaked");
}

/// Sends raw datagrams with any descriptors, bypassing Channel::send's own checks.
fn raw_send(channel: &Channel, bytes: &[u8], fds: &[i32]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [std::io::IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(channel.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
}

fn unexpected_descriptors_are_refused_and_closed() {
    let (a, b) = Channel::pair().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let before = open_fds();
    // A log line must not carry a descriptor.
    let err = a.send(&log("x"), &[r.as_fd()]).unwrap_err();
    assert!(matches!(
        err,
        ChannelError::UnexpectedFds {
            kind: "log",
            expected: 0,
            got: 1
        }
    ));
    use prost::Message;
    raw_send(&a, &log("x").encode_to_vec(), &[r.as_raw_fd(), w.as_raw_fd()]);
    let err = b.recv::<WorkerToSupervisor>().unwrap_err();
    assert!(
        matches!(
            err,
            ChannelError::UnexpectedFds {
                kind: "log",
                expected: 0,
                got: 2
            }
        ),
        "{err}"
    );
    // A listener handoff without its socket is refused too.
    raw_send(&a, &listener_handoff().encode_to_vec(), &[]);
    let err = b.recv::<SupervisorToWorker>().unwrap_err();
    assert!(
        matches!(
            err,
            ChannelError::UnexpectedFds {
                kind: "listener",
                expected: 1,
                got: 0
            }
        ),
        "{err}"
    );
    assert_eq!(open_fds(), before, "received descriptors were not closed");
}

fn too_many_descriptors_is_ctrunc_and_nothing_leaks() {
    let (a, b) = Channel::pair().unwrap();
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..MAX_FDS + 2).map(|_| nix::unistd::pipe().unwrap()).collect();
    let raw: Vec<i32> = pipes.iter().map(|(r, _)| r.as_raw_fd()).collect();
    let before = open_fds();
    use prost::Message;
    raw_send(&a, &listener_handoff().encode_to_vec(), &raw);
    let err = b.recv::<SupervisorToWorker>().unwrap_err();
    assert!(matches!(err, ChannelError::ControlTruncated), "{err}");
    assert_eq!(open_fds(), before, "descriptors that did arrive were not closed");
}

fn garbage_and_close_are_typed() {
    let (a, b) = Channel::pair().unwrap();
    let before = open_fds();
    raw_send(&a, &[0xff, 0xff, 0xff], &[]);
    assert!(matches!(
        b.recv::<WorkerToSupervisor>().unwrap_err(),
        ChannelError::Decode { len: 3, .. }
    ));
    // A valid protobuf message with no kind (e.g. another message type).
    raw_send(&a, &[0x78, 0x01], &[]); // field 15, unknown to every link message
    assert!(matches!(
        b.recv::<WorkerToSupervisor>().unwrap_err(),
        ChannelError::Empty
    ));
    let big = vec![b'x'; rampart_command::channel::MAX_MESSAGE + 10];
    raw_send(&a, &big, &[]);
    assert!(matches!(
        b.recv::<WorkerToSupervisor>().unwrap_err(),
        ChannelError::Truncated
    ));
    let huge = WorkerToSupervisor {
        kind: Some(worker_to_supervisor::Kind::Log(proto::LogLine {
            level: 0,
            target: String::new(),
            message: "y".repeat(70_000),
        })),
    };
    assert!(matches!(a.send(&huge, &[]).unwrap_err(), ChannelError::TooLarge { .. }));
    drop(a);
    assert!(b.recv::<WorkerToSupervisor>().unwrap().is_none());
    assert_eq!(open_fds(), before - 1, "only the dropped end is gone");
}

/// A message of one link sent on another is refused by its receiver: a private key meant for
/// the keyring never decodes as anything a worker acts on, a worker's reply is nothing to a
/// worker, and a listener handoff is nothing to the keyring.
fn a_wrong_direction_message_is_refused() {
    let (a, b) = Channel::pair().unwrap();
    let key = SupervisorToKeyring {
        kind: Some(supervisor_to_keyring::Kind::KeyMaterial(proto::KeyMaterial {
            fingerprint: "ab".into(),
            key: b"-----BEGIN PRIVATE KEY-----".to_vec(),
            sequence: 1,
        })),
    };
    a.send(&key, &[]).unwrap();
    assert!(matches!(
        b.recv::<SupervisorToWorker>().unwrap_err(),
        ChannelError::Empty
    ));
    let reply = WorkerToSupervisor {
        kind: Some(worker_to_supervisor::Kind::Reply(proto::WorkerReply::default())),
    };
    a.send(&reply, &[]).unwrap();
    assert!(matches!(
        b.recv::<SupervisorToWorker>().unwrap_err(),
        ChannelError::Empty
    ));
    a.send(&log("to the keyring?"), &[]).unwrap();
    assert!(matches!(
        b.recv::<SupervisorToKeyring>().unwrap_err(),
        ChannelError::Empty
    ));
    let sign = proto::WorkerToKeyring {
        kind: Some(proto::worker_to_keyring::Kind::SignRequest(
            proto::SignRequest::default(),
        )),
    };
    a.send(&sign, &[]).unwrap();
    assert!(matches!(
        b.recv::<WorkerToSupervisor>().unwrap_err(),
        ChannelError::Empty
    ));
    // The right receiver takes each of them.
    a.send(&key, &[]).unwrap();
    assert!(b.recv::<SupervisorToKeyring>().unwrap().is_some());
}

/// A request too large for one datagram travels in pieces and comes back whole.
fn a_large_order_travels_in_pieces() {
    use rampart_command::channel::{MAX_MESSAGE, OrderAssembler, order_messages};
    let requests: Vec<proto::Request> = (0..5000)
        .map(|i| proto::Request {
            id: String::new(),
            kind: Some(proto::request::Kind::AddCluster(proto::Cluster {
                cluster_id: format!("cluster-{i:05}"),
                ..Default::default()
            })),
        })
        .collect();
    let batch = proto::Request {
        id: "big".into(),
        kind: Some(proto::request::Kind::Apply(proto::Batch {
            requests,
            base_state_hash: String::new(),
        })),
    };
    let messages = order_messages(7, batch.clone());
    assert!(messages.len() > 1, "{} message(s)", messages.len());
    let (a, b) = Channel::pair().unwrap();
    let mut assembler = OrderAssembler::default();
    let mut whole = None;
    for order in messages.clone() {
        let message = SupervisorToWorker {
            kind: Some(supervisor_to_worker::Kind::Order(order)),
        };
        a.send(&message, &[]).unwrap();
        let received = b.recv::<SupervisorToWorker>().unwrap().unwrap();
        assert!(prost::Message::encoded_len(&received.message) <= MAX_MESSAGE);
        let Some(supervisor_to_worker::Kind::Order(order)) = received.message.kind else {
            panic!()
        };
        if let Some(done) = assembler.push(order).unwrap() {
            whole = Some(done);
        }
    }
    let whole = whole.expect("the last piece completes the order");
    assert_eq!(whole.sequence, 7);
    assert_eq!(whole.request, Some(batch));
    // A small order passes through at once.
    let small = order_messages(8, proto::Request::default());
    assert_eq!(small.len(), 1);
}
