//! Standings of worker identities: reputation, strikes for protocol offences, bans. Kept
//! across reconnects and restarts (the driver persists every change it is told of).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use verify::{Reputation, WorkerId};

/// What the run knows of a worker identity (persisted in checkpoints and the log).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Standing {
    /// Tasks accepted, checks passed and failed, banned.
    pub rep: Reputation,
    /// Protocol offences and unanswered challenges.
    pub strikes: u32,
    /// Why it was banned.
    pub ban_reason: Option<String>,
}

/// Accepted results after which one strike is forgiven.
pub const FORGIVE_EVERY: u64 = 50;

/// The standings of every identity seen, with the ban rule: `max_strikes` strikes, or one
/// failed spot check.
pub struct Discipline {
    standings: HashMap<WorkerId, Standing>,
    max_strikes: u32,
}

impl Discipline {
    /// Standings recovered from disk; a worker is banned at `max_strikes` strikes.
    pub fn new(standings: Vec<(WorkerId, Standing)>, max_strikes: u32) -> Self {
        Discipline {
            standings: standings.into_iter().collect(),
            max_strikes: max_strikes.max(1),
        }
    }

    /// A worker's standing (default for a new one).
    pub fn standing(&self, w: &WorkerId) -> Standing {
        self.standings.get(w).cloned().unwrap_or_default()
    }

    /// Whether `w` is banned.
    pub fn is_banned(&self, w: &WorkerId) -> bool {
        self.standings.get(w).is_some_and(|s| s.rep.banned)
    }

    /// Every standing, sorted by key (for checkpoints).
    pub fn all(&self) -> Vec<(WorkerId, Standing)> {
        let mut v: Vec<_> = self
            .standings
            .iter()
            .map(|(w, s)| (*w, s.clone()))
            .collect();
        v.sort_by_key(|(w, _)| *w);
        v
    }

    /// Every banned identity.
    pub fn banned(&self) -> impl Iterator<Item = &WorkerId> {
        self.standings
            .iter()
            .filter(|(_, s)| s.rep.banned)
            .map(|(w, _)| w)
    }

    /// Counts an accepted result; strikes fade, one every [`FORGIVE_EVERY`] results.
    pub fn accepted(&mut self, w: WorkerId) -> Standing {
        self.update(w, |s| {
            s.rep.tasks += 1;
            if s.rep.tasks.is_multiple_of(FORGIVE_EVERY) {
                s.strikes = s.strikes.saturating_sub(1);
            }
        })
    }

    /// Counts a passed spot check.
    pub fn passed(&mut self, w: WorkerId) -> Standing {
        self.update(w, |s| s.rep.checks_passed += 1)
    }

    /// Adds a strike; returns the new standing and whether it now calls for a ban (it did
    /// not before).
    pub fn strike(&mut self, w: WorkerId) -> (Standing, bool) {
        let s = self.update(w, |s| s.strikes += 1);
        let ban = s.strikes >= self.max_strikes && !s.rep.banned;
        (s, ban)
    }

    /// Bans `w` (a failed check, or too many strikes).
    pub fn ban(&mut self, w: WorkerId, reason: &str) -> Standing {
        self.update(w, |s| {
            s.rep.banned = true;
            s.rep.checks_failed += 1;
            s.ban_reason = Some(reason.to_string());
        })
    }

    fn update(&mut self, w: WorkerId, f: impl FnOnce(&mut Standing)) -> Standing {
        let s = self.standings.entry(w).or_default();
        f(s);
        s.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strikes_ban_once_and_fade() {
        let w = WorkerId([1; 32]);
        let mut d = Discipline::new(Vec::new(), 2);
        assert!(!d.strike(w).1);
        for _ in 0..FORGIVE_EVERY {
            d.accepted(w);
        }
        assert_eq!(d.standing(&w).strikes, 0, "one strike forgiven");
        assert!(!d.strike(w).1);
        assert!(d.strike(w).1, "the second strike bans");
        d.ban(w, "2 strikes");
        assert!(d.is_banned(&w));
        assert!(!d.strike(w).1, "a ban is decided once");
        let back = Discipline::new(d.all(), 2);
        assert!(back.is_banned(&w), "standings survive a restart");
    }
}
