//! The bounds the `/retrieve` server puts on what one client can hold or ask for.
//!
//! Without them a client that sends half a request holds a connection forever, a flood of idle
//! connections exhausts file descriptors, and one small request (8192 queries × topk 100) makes
//! the server search and serialise ~800k passages. Every limit is settable from
//! `memgen retriever serve` (the flag is named in each field's doc) and in every error the
//! server answers, so a client that hits one knows which knob it ran into.

use super::RetrievalError;
use std::time::Duration;

/// Server limits. [`ServerLimits::DEFAULT`] (= `Default`) is sized for Search-R1 style use: a
/// full training batch of single-turn queries at the default topk fits in one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerLimits {
    /// Connections served at once (`--max-connections`). When all slots are taken, a new
    /// connection first evicts the connection that has been idle longest (no request in
    /// progress); if every slot is mid-request it waits up to `connection_wait` for one, then is
    /// answered 503 and closed. At most as many connections wait as are served.
    pub max_connections: usize,
    /// How long a connection may wait for a free slot (`--connection-wait`, seconds).
    pub connection_wait: Duration,
    /// Time to receive a request's headers, counted from when the server starts waiting for
    /// them: connection open, or the previous answer on a keep-alive connection
    /// (`--header-timeout`, seconds). Past it the connection is closed.
    pub header_timeout: Duration,
    /// Time to receive a request's body and compute its answer, counted from the end of its
    /// headers (408 for a body still missing, 503 for a search still running); also the longest
    /// a write of the answer may stall on a client that does not read (`--request-timeout`,
    /// seconds).
    pub request_timeout: Duration,
    /// Largest request body in bytes (`--max-body-bytes`); larger gets 413.
    pub max_body_bytes: usize,
    /// Most queries in one request (`--max-queries`); more gets 400.
    pub max_queries: usize,
    /// Largest `topk` (`--max-topk`); larger gets 400.
    pub max_topk: usize,
    /// Most passages one request may ask for, queries × topk (`--max-results`); more gets 400.
    /// This, not `max_queries` or `max_topk` alone, bounds the work and the answer's size.
    pub max_results: usize,
}

impl ServerLimits {
    /// The defaults, as a constant so the CLI can show them in `--help`.
    pub const DEFAULT: Self = Self {
        max_connections: 256,
        connection_wait: Duration::from_secs(2),
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        max_body_bytes: 1 << 20,
        max_queries: 8192,
        max_topk: 100,
        // 8192 queries at the default topk 3: a whole Search-R1 batch (512 prompts × 5
        // rollouts = 2560 queries) has room to spare, while 8192 × 100 does not get through.
        max_results: 8192 * 3,
    };

    /// Check that every limit can be met by some request (no zeros, no zero durations).
    pub fn validate(&self) -> Result<(), RetrievalError> {
        let counts = [
            ("max_connections", self.max_connections),
            ("max_body_bytes", self.max_body_bytes),
            ("max_queries", self.max_queries),
            ("max_topk", self.max_topk),
            ("max_results", self.max_results),
        ];
        for (name, value) in counts {
            if value == 0 {
                return Err(RetrievalError::InvalidLimit(format!(
                    "{name} (--{}) must be at least 1",
                    name.replace('_', "-")
                )));
            }
        }
        let durations = [
            ("connection_wait", self.connection_wait),
            ("header_timeout", self.header_timeout),
            ("request_timeout", self.request_timeout),
        ];
        for (name, value) in durations {
            if value.is_zero() {
                return Err(RetrievalError::InvalidLimit(format!(
                    "{name} (--{}) must be longer than 0 s",
                    name.replace('_', "-")
                )));
            }
        }
        Ok(())
    }

    /// Which work limit a request of `queries` queries at `topk` breaks, if any, as
    /// (limit name, message). Checked in the order a client would fix them.
    pub fn check_work(&self, queries: usize, topk: usize) -> Option<(&'static str, String)> {
        if topk > self.max_topk {
            return Some((
                "max_topk",
                format!(
                    "`topk` must be at most {} (--max-topk), got {topk}",
                    self.max_topk
                ),
            ));
        }
        if queries > self.max_queries {
            return Some((
                "max_queries",
                format!(
                    "at most {} queries per request (--max-queries), got {queries}",
                    self.max_queries
                ),
            ));
        }
        // Both factors are bounded above, but saturate anyway: the limits are settable.
        let results = queries.saturating_mul(topk);
        if results > self.max_results {
            return Some((
                "max_results",
                format!(
                    "at most {} passages per request, queries × topk (--max-results), got \
                     {queries} × {topk} = {results}",
                    self.max_results
                ),
            ));
        }
        None
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A positive, finite number of seconds as a `Duration` (the CLI's parser for timeouts).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds, got {s:?}"))?;
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("expected a positive number of seconds, got {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_admit_search_r1_batches() {
        let l = ServerLimits::default();
        assert_eq!(l, ServerLimits::DEFAULT);
        l.validate().unwrap();
        assert_eq!(l.check_work(2560, 3), None);
        assert_eq!(l.check_work(8192, 3), None);
        assert_eq!(l.check_work(1, 100), None);
        assert_eq!(l.check_work(0, 100), None);
    }

    #[test]
    fn work_limits_name_the_limit() {
        let l = ServerLimits::default();
        assert_eq!(l.check_work(1, 101).unwrap().0, "max_topk");
        assert_eq!(l.check_work(8193, 1).unwrap().0, "max_queries");
        let (name, msg) = l.check_work(8192, 100).unwrap();
        assert_eq!(name, "max_results");
        assert!(msg.contains("8192 × 100 = 819200"), "{msg}");
        assert!(msg.contains("--max-results"), "{msg}");
        let huge = ServerLimits {
            max_queries: usize::MAX,
            max_topk: usize::MAX,
            ..l
        };
        assert_eq!(
            huge.check_work(usize::MAX, usize::MAX).unwrap().0,
            "max_results"
        );
    }

    #[test]
    fn zero_limits_are_refused() {
        let zero_conns = ServerLimits {
            max_connections: 0,
            ..Default::default()
        };
        let e = zero_conns.validate().unwrap_err().to_string();
        assert!(e.contains("max_connections (--max-connections)"), "{e}");
        let zero_wait = ServerLimits {
            header_timeout: Duration::ZERO,
            ..Default::default()
        };
        let e = zero_wait.validate().unwrap_err().to_string();
        assert!(e.contains("header_timeout"), "{e}");
    }

    #[test]
    fn parses_seconds() {
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_secs(" 2 "), Ok(Duration::from_secs(2)));
        for bad in ["0", "-1", "nan", "inf", "soon", ""] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }
}
