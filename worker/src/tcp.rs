//! A TCP listener's connection: the one byte pipe between the client and one backend of the
//! listener's cluster.

use std::rc::Rc;
use std::time::Instant;

use mio::Token;
use mio::net::TcpStream;

use crate::ListenerInfo;
use crate::backend::{self, BackendConn};
use crate::event_loop::{Context, Status};
use crate::pipe::{Flow, Pipe};
use crate::pool::Checkout;
use crate::record::{Carrier, Failure, RequestRecord};

pub struct TcpSession {
    front: TcpStream,
    front_token: Token,
    back: Option<BackendConn>,
    listener: Rc<ListenerInfo>,
    pipe: Pipe,
    began: Instant,
    failed: bool,
    pub deadline: Instant,
}

impl TcpSession {
    /// Connects to a backend of `cluster` and returns the session, or None when no backend is
    /// available (the client connection is then closed).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        front: TcpStream,
        front_token: Token,
        key: usize,
        listener: Rc<ListenerInfo>,
        cluster: &str,
        up: Checkout,
        down: Checkout,
        ctx: &mut Context<'_>,
    ) -> Option<TcpSession> {
        let mut tried = Vec::new();
        let back = backend::connect(ctx, key, cluster, None, &mut tried).ok()?;
        let deadline = ctx.now + listener.timeouts.client_idle.unwrap_or(ctx.timeouts.client_idle);
        Some(TcpSession {
            front,
            front_token,
            back: Some(back),
            listener,
            pipe: Pipe::new(up, down),
            began: ctx.now,
            failed: false,
            deadline,
        })
    }

    /// Closes both sockets and writes the connection's record (`failure` when the worker cut it).
    pub fn close(&mut self, ctx: &mut Context<'_>, failure: Option<Failure>) {
        let record = RequestRecord {
            carrier: Carrier::Tcp,
            listener: &self.listener.address,
            cluster: self.back.as_ref().map(|b| b.cluster.as_str()),
            backend: self.back.as_ref().map(|b| b.backend_id.as_str()),
            status: 0,
            began: self.began,
            finished: ctx.now,
            bytes_in: self.pipe.bytes_in,
            bytes_out: self.pipe.bytes_out,
            failure: failure.or(self.failed.then_some(Failure::SocketError)),
            connect_time: None,
            first_byte_time: None,
        };
        ctx.records.finish(&record);
        if let Some(back) = self.back.take() {
            back.release(ctx, false);
        }
        let _ = ctx.registry.deregister(&mut self.front);
        ctx.tokens.release(self.front_token);
    }

    pub fn run(&mut self, ctx: &mut Context<'_>) -> Status {
        let Some(back) = &mut self.back else {
            return Status::Close;
        };
        match self.pipe.run(&mut self.front, &mut back.stream) {
            Flow::Open { moved } => {
                if moved {
                    self.deadline = ctx.now + self.listener.timeouts.client_idle.unwrap_or(ctx.timeouts.client_idle);
                }
                Status::Open
            }
            Flow::Done { failed } => {
                self.failed = failed;
                Status::Close
            }
        }
    }
}
