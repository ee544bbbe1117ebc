//! The token registry: every socket a session owns (its client connection, one or many backend
//! connections) is registered with the event loop under a token of its own, and the registry
//! says which session and which of its sockets a token names. One HTTP/1.1 session owns two
//! sockets; an HTTP/2 session will own one client connection and a backend connection per
//! stream it forwards.

use mio::Token;
use slab::Slab;

/// Tokens below this are the channel, the keyring link and the listeners.
pub const FIRST_SESSION_TOKEN: usize = 1 << 16;

/// Which of a session's sockets a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's connection.
    Front,
    /// A connection to a backend.
    Back,
}

/// Token → (session key, side).
#[derive(Debug, Default)]
pub struct Tokens {
    owners: Slab<(usize, Side)>,
}

impl Tokens {
    /// A new token for a socket of `session`.
    pub fn take(&mut self, session: usize, side: Side) -> Token {
        Token(FIRST_SESSION_TOKEN + self.owners.insert((session, side)))
    }

    /// The socket is deregistered: its token may name another one.
    pub fn release(&mut self, token: Token) {
        if let Some(index) = token.0.checked_sub(FIRST_SESSION_TOKEN) {
            self.owners.try_remove(index);
        }
    }

    /// Whose socket the token names (None for a token released since the event was queued).
    pub fn owner(&self, token: Token) -> Option<(usize, Side)> {
        let index = token.0.checked_sub(FIRST_SESSION_TOKEN)?;
        self.owners.get(index).copied()
    }

    /// Sockets registered.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_owns_many_tokens_and_released_ones_name_nobody() {
        let mut tokens = Tokens::default();
        let front = tokens.take(7, Side::Front);
        let back1 = tokens.take(7, Side::Back);
        let back2 = tokens.take(7, Side::Back);
        assert_eq!(tokens.owner(front), Some((7, Side::Front)));
        assert_eq!(tokens.owner(back2), Some((7, Side::Back)));
        assert_ne!(back1, back2);
        tokens.release(back1);
        assert_eq!(tokens.owner(back1), None);
        assert_eq!(tokens.owner(Token(3)), None);
        let other = tokens.take(9, Side::Front);
        assert_eq!(tokens.owner(other), Some((9, Side::Front)));
        assert_eq!(tokens.len(), 3);
    }
}
