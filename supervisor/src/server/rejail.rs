//! Re-jail on demand: a backend added at runtime on a port the workers' landlock rules do not
//! allow. Landlock rules are fixed when a process enters them, so the workers are replaced, one
//! by one, by workers whose jail allows the new port (the old one of each slot drains, as after
//! any replacement); once every slot runs a worker with the wider jail, the change is applied
//! like any other. Refused instead when `sandbox.closed_backend_ports` is set.

use super::*;

/// How long the replacements may take before the change is given up.
const REJAIL_TIMEOUT: Duration = Duration::from_secs(60);

/// A backend change waiting for the workers' new jails.
pub(super) struct Rejail {
    key: usize,
    serial: u64,
    peer: Peer,
    request: proto::Request,
    content: Option<proto::response::Content>,
    ports: BTreeSet<u16>,
    /// Worker slots still to replace, and the one being replaced with the pid it had.
    queue: VecDeque<u32>,
    current: Option<(u32, Option<Pid>)>,
    deadline: Instant,
}

impl Supervisor {
    pub(super) fn begin_rejail(
        &mut self,
        key: usize,
        peer: Peer,
        request: proto::Request,
        content: Option<proto::response::Content>,
        ports: BTreeSet<u16>,
    ) {
        if let ConnectRule::Ports(allowed) = &mut self.launch.jail.connect {
            allowed.extend(ports.iter().copied());
            allowed.sort_unstable();
            allowed.dedup();
        }
        let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let message = format!("workers are replaced one by one with jails that allow backend port(s) {list}");
        self.log.info(&message);
        self.audit.system("workers_rejailed", &message);
        let queue = self.workers.iter().filter(|w| !w.keyring).map(|w| w.id).collect();
        self.rejail = Some(Rejail {
            serial: self.clients.get(key).map_or(0, |c| c.serial),
            key,
            peer,
            request,
            content,
            ports,
            queue,
            current: None,
            deadline: Instant::now() + REJAIL_TIMEOUT,
        });
        self.rejail_next();
    }

    /// Replaces the next worker once the previous replacement runs; applies the change after
    /// the last.
    pub(super) fn rejail_next(&mut self) {
        let Some(rejail) = &mut self.rejail else { return };
        if let Some((id, old)) = rejail.current {
            let slot = self.workers.get(id as usize);
            let replaced = slot.is_some_and(|w| w.run_state == RunState::Running && w.pid != old);
            if !replaced {
                return;
            }
            rejail.current = None;
        }
        if let Some(id) = rejail.queue.pop_front() {
            let old = self.workers.get(id as usize).and_then(|w| w.pid);
            rejail.current = Some((id, old));
            let ports = rejail.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
            if old.is_some() {
                self.replace_process(
                    id,
                    &format!("re-jailed to allow backend port(s) {ports}"),
                    self.upgrade_grace(0),
                );
            } else {
                // A dead slot is respawned with the new profile anyway.
                self.spawn(id);
            }
            return;
        }
        let Some(done) = self.rejail.take() else { return };
        self.log
            .info("every worker runs with the wider jail; applying the backend change");
        // A client gone meanwhile gets no answer (its connection slot may be another's now).
        let key = if self.client_serial(done.key) == Some(done.serial) {
            done.key
        } else {
            usize::MAX
        };
        self.state_change(key, done.peer, done.request, Ok(()), done.content);
    }

    /// A re-jail that does not finish gives the change up.
    pub(super) fn watch_rejail(&mut self, now: Instant) {
        if self.rejail.as_ref().is_none_or(|r| now < r.deadline) {
            return;
        }
        let Some(failed) = self.rejail.take() else { return };
        let message = format!(
            "the workers could not be re-jailed within {} s; the backend change was not applied",
            REJAIL_TIMEOUT.as_secs()
        );
        self.log.error(&message);
        self.audit
            .denied(&failed.peer, &failed.request, "rejail_failed", &message);
        let id = failed.request.id.clone();
        if self.client_serial(failed.key) == Some(failed.serial) {
            self.respond(failed.key, &id, false, message, None);
        }
    }
}
