//! What the client sees as its greeting, and our own replies.
//!
//! With the banner challenge on, the client gets `220-HOST ESMTP` at accept
//! and the upstream's banner as the last line(s) when the greet delay ends:
//! one valid multi-line 220 reply (RFC 5321 §4.2: all lines share the code).
//! A conforming client reads a whole reply before it speaks; ratware that
//! answers the first line it sees gives itself away.
//!
//! Once `220-` is out, a refusal cannot follow as part of the same reply, so
//! an upstream that is down or refuses (421, 554) is handled the way RFC 5321
//! §3.1 allows a server to refuse later: finish the greeting with a plain
//! `220`, then answer the client's first command with the refusal. The mail
//! is never accepted, so nothing is lost: the sender retries on 4xx.

use crate::reply::Reply;

/// The challenge line sent at accept.
pub fn challenge_line(hostname: &str) -> Vec<u8> {
    format!("220-{hostname} ESMTP\r\n").into_bytes()
}

/// `421 4.3.2`: the sender should come back later (RFC 3463: system not
/// accepting network messages).
pub fn tempfail_reply(hostname: &str) -> Vec<u8> {
    format!("421 4.3.2 {hostname} Service not available, try again later\r\n").into_bytes()
}

/// `554 5.7.1` for a client that talked before its turn.
pub fn pregreet_reject_reply(hostname: &str) -> Vec<u8> {
    format!("554 5.7.1 {hostname} Protocol error: talking before the greeting\r\n").into_bytes()
}

/// `554 5.7.1` for a client on the blocklist.
pub fn blocked_reply(hostname: &str, client: std::net::IpAddr) -> Vec<u8> {
    format!("554 5.7.1 {hostname} Service unavailable; client [{client}] blocked\r\n").into_bytes()
}

/// `221` for a client that says QUIT to a deferred refusal.
pub fn closing_reply(hostname: &str) -> Vec<u8> {
    format!("221 2.0.0 {hostname} closing connection\r\n").into_bytes()
}

/// How the upstream's greeting went.
#[derive(Debug, Clone, Copy)]
pub enum UpstreamGreeting<'a> {
    /// The upstream sent this reply as its greeting.
    Replied(&'a Reply),
    /// Unreachable, refused, reset, silent or unreadable.
    Failed,
}

/// What to send the client when the greet delay ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreetingPlan {
    /// Bytes that end the greeting (after the challenge line, if any).
    pub to_client: Vec<u8>,
    /// A refusal to give at the client's first command, after which the
    /// session ends; `None` when the session goes on to the upstream.
    pub deferred_refusal: Option<Vec<u8>>,
    /// The session ends right after `to_client` (no upstream to relay to).
    pub close: bool,
}

/// Decides the end of the greeting from the upstream's and whether the
/// challenge line already went out.
pub fn plan_greeting(
    upstream: UpstreamGreeting<'_>,
    challenge_sent: bool,
    hostname: &str,
) -> GreetingPlan {
    match (upstream, challenge_sent) {
        (UpstreamGreeting::Replied(reply), _) if reply.code == 220 => GreetingPlan {
            to_client: reply.raw.clone(),
            deferred_refusal: None,
            close: false,
        },
        // Without the challenge the upstream's word is passed on as it is:
        // a 554 banner still lets the client QUIT politely through it.
        (UpstreamGreeting::Replied(reply), false) => GreetingPlan {
            to_client: reply.raw.clone(),
            deferred_refusal: None,
            close: false,
        },
        (UpstreamGreeting::Failed, false) => GreetingPlan {
            to_client: tempfail_reply(hostname),
            deferred_refusal: None,
            close: true,
        },
        (upstream, true) => {
            let refusal = match upstream {
                UpstreamGreeting::Replied(reply) if reply.is_refusal() => reply.raw.clone(),
                _ => tempfail_reply(hostname),
            };
            GreetingPlan {
                to_client: format!("220 {hostname} ESMTP\r\n").into_bytes(),
                deferred_refusal: Some(refusal),
                close: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::ReplyReader;

    fn reply(bytes: &[u8]) -> Reply {
        ReplyReader::new(4096).push(bytes).unwrap().unwrap()
    }

    #[test]
    fn a_220_banner_ends_the_challenge_with_the_same_code() {
        let banner = reply(b"220 mx.test ESMTP Postfix\r\n");
        let plan = plan_greeting(UpstreamGreeting::Replied(&banner), true, "gw.test");
        let mut seen = challenge_line("gw.test");
        seen.extend_from_slice(&plan.to_client);
        assert_eq!(seen, b"220-gw.test ESMTP\r\n220 mx.test ESMTP Postfix\r\n");
        assert_eq!(plan.deferred_refusal, None);
        assert!(!plan.close);
    }

    #[test]
    fn a_refusing_upstream_after_the_challenge_is_heard_at_the_first_command() {
        let banner = reply(b"554 5.3.2 mx.test no service here\r\n");
        let plan = plan_greeting(UpstreamGreeting::Replied(&banner), true, "gw.test");
        assert_eq!(plan.to_client, b"220 gw.test ESMTP\r\n");
        assert_eq!(
            plan.deferred_refusal.as_deref(),
            Some(&b"554 5.3.2 mx.test no service here\r\n"[..])
        );
    }

    #[test]
    fn a_failed_upstream_after_the_challenge_is_a_deferred_421() {
        let plan = plan_greeting(UpstreamGreeting::Failed, true, "gw.test");
        assert_eq!(plan.to_client, b"220 gw.test ESMTP\r\n");
        let refusal = plan.deferred_refusal.unwrap();
        assert!(refusal.starts_with(b"421 4.3.2 "));
    }

    #[test]
    fn an_odd_code_after_the_challenge_is_treated_as_a_failure() {
        let banner = reply(b"250 what\r\n");
        let plan = plan_greeting(UpstreamGreeting::Replied(&banner), true, "gw.test");
        assert!(plan.deferred_refusal.unwrap().starts_with(b"421 4.3.2 "));
    }

    #[test]
    fn without_the_challenge_a_refusal_passes_as_it_is() {
        let banner = reply(b"421 4.7.0 mx.test busy\r\n");
        let plan = plan_greeting(UpstreamGreeting::Replied(&banner), false, "gw.test");
        assert_eq!(plan.to_client, b"421 4.7.0 mx.test busy\r\n");
        assert_eq!(plan.deferred_refusal, None);
    }

    #[test]
    fn without_the_challenge_a_failure_is_421_and_close() {
        let plan = plan_greeting(UpstreamGreeting::Failed, false, "gw.test");
        assert!(plan.to_client.starts_with(b"421 4.3.2 gw.test "));
        assert!(plan.close);
    }
}
