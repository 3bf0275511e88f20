//! Which ranks on this machine are still alive: lets a rank waiting in a collective tell a peer
//! that died (killed, crashed) from one that is merely slow.
//!
//! Why: a rank killed by the OOM killer or a `kill -9` leaves the others waiting in their
//! collective. `mpirun` notices at once and ends the job, but `srun` waits — until
//! `--kill-on-bad-exit` or KillWait ends the step, or for ever — and says nothing about which
//! rank went. The survivors cannot learn it from MPI (a blocked collective takes no timeout and
//! shared-memory transports never see the peer go), but a peer on the same machine is visible
//! in `/proc`: the watchdog checks there while it waits, and reports the dead rank by name.
//!
//! A peer is identified by its pid *and* its start time (a pid reused by a new process is not
//! the peer), and only peers that share this rank's kernel boot and pid namespace are watched
//! (elsewhere the pid would name another process). Ranks on other machines are left to the
//! stall timeout.

use std::fs;

use anyhow::Result;

use super::Communicator;

/// A rank on this machine, as `/proc` showed it at start-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peer {
    pub rank: usize,
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`: clock ticks after boot at which the process started.
    start_ticks: u64,
}

/// The peers of this rank that share its machine and pid namespace (empty off Linux).
pub fn local_peers(comm: &dyn Communicator) -> Result<Vec<Peer>> {
    let me = identity();
    let all = comm.all_gather_f64(&me)?;
    let world = comm.world();
    Ok(all
        .chunks_exact(me.len())
        .enumerate()
        .filter(|&(rank, id)| rank != world.rank && id[..2] == me[..2] && me[0] != 0.0)
        .map(|(rank, id)| Peer {
            rank,
            pid: id[2] as u32,
            start_ticks: id[3] as u64,
        })
        // Seen now as it was described: the same process (guards against a hash collision).
        .filter(|p| p.alive())
        .collect())
}

impl Peer {
    /// The peer is still running (a zombie, an exited or a replaced pid is not).
    pub fn alive(&self) -> bool {
        match stat(&format!("/proc/{}/stat", self.pid)) {
            Some((state, start)) => start == self.start_ticks && !matches!(state, 'Z' | 'X'),
            None => false,
        }
    }
}

/// This process as the others can check it: [machine, pid namespace, pid, start ticks], every
/// value exact in an f64 (0 for the machine where `/proc` does not tell).
fn identity() -> [f64; 4] {
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|id| u64::from_str_radix(&id.trim().replace('-', "")[..12], 16).ok())
        .unwrap_or(0);
    let pid_ns = fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|l| {
            let l = l.to_string_lossy().into_owned();
            l.trim_start_matches("pid:[")
                .trim_end_matches(']')
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    let start = stat("/proc/self/stat").map_or(0, |(_, s)| s);
    [
        boot as f64,
        f64::from(pid_ns),
        f64::from(std::process::id()),
        start as f64,
    ]
}

/// (state, start ticks) of a `/proc/PID/stat` file. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted from its last `)`.
fn stat(path: &str) -> Option<(char, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3) come fields 4..; the start time is field 22.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::Local;

    #[test]
    fn this_process_is_alive_and_a_replaced_or_gone_pid_is_not() {
        let id = identity();
        if id[0] == 0.0 {
            return; // not Linux: nothing to check
        }
        let me = Peer {
            rank: 0,
            pid: std::process::id(),
            start_ticks: id[3] as u64,
        };
        assert!(me.alive());
        let reused = Peer {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(!reused.alive(), "same pid, another start time");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let (_, start) = stat(&format!("/proc/{pid}/stat")).unwrap();
        let peer = Peer {
            rank: 1,
            pid,
            start_ticks: start,
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!peer.alive(), "an exited child (a zombie until reaped)");
        child.wait().unwrap();
        assert!(!peer.alive(), "a reaped child");
        assert!(local_peers(&Local).unwrap().is_empty(), "a world of one");
    }

    #[test]
    fn the_stat_parser_counts_fields_after_the_command_name() {
        let dir = std::env::temp_dir().join(format!("fsct-stat-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stat");
        let mut fields: Vec<String> = (4..=52).map(|i| i.to_string()).collect();
        fields[22 - 4] = "987654".into();
        fs::write(&path, format!("42 (a b) c)) S {}", fields.join(" "))).unwrap();
        assert_eq!(stat(path.to_str().unwrap()), Some(('S', 987654)));
        fs::remove_dir_all(&dir).unwrap();
    }
}
