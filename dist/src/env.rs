//! What a worker learns from its environment: torchrun's variables plus Tessera's run id.
//!
//! | variable            | meaning                                                     |
//! |---------------------|-------------------------------------------------------------|
//! | `RANK`              | this worker's rank in [0, `WORLD_SIZE`)                     |
//! | `WORLD_SIZE`        | number of workers in the run                                |
//! | `LOCAL_RANK`        | rank among the workers of this node                         |
//! | `LOCAL_WORLD_SIZE`  | number of workers on this node                              |
//! | `MASTER_ADDR`       | host of the rendezvous store (node 0's launcher)            |
//! | `MASTER_PORT`       | its TCP port                                                |
//! | `TESSERA_RUN_ID`    | the run id every frame to the store carries                 |
//! | `TESSERA_RESTART_COUNT` | the gang's generation: 0, then +1 per restart (default 0) |
//! | `TESSERA_STORE_SECRET_FILE` | a file (mode 0600) holding the run's secret, which authenticates every frame to the store |
//! | `TESSERA_STORE_SECRET` | the secret itself, when no file is named |
//! | `TESSERA_LAUNCHER_PID` | the launcher's pid: a worker whose launcher is gone does not join (optional) |
//!
//! `RANK` and `WORLD_SIZE` both absent means a plain single-process run; one without the other,
//! or any of the others missing or malformed, is an error naming the variable.

use super::auth::{self, Credentials, Secret};
use std::fmt;

/// The environment of one worker of a multi-process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub run_id: String,
    /// The gang's generation (restarts so far).
    pub generation: u64,
    /// The run's secret (its `Debug` does not show it).
    pub secret: Secret,
    /// The pid of the launcher that started this worker, when it says.
    pub launcher_pid: Option<u32>,
}

/// A variable of [`WorkerEnv`] that is missing, unparsable or out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {var}: {message}")]
pub struct EnvError {
    pub var: &'static str,
    pub message: String,
}

impl WorkerEnv {
    /// Reads the process environment. `Ok(None)`: neither `RANK` nor `WORLD_SIZE` is set, so
    /// this is a single-process run.
    pub fn from_env() -> Result<Option<WorkerEnv>, EnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`WorkerEnv::from_env`] over any lookup (tests pass a map).
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<WorkerEnv>, EnvError> {
        let (rank, world) = (get("RANK"), get("WORLD_SIZE"));
        if rank.is_none() && world.is_none() {
            return Ok(None);
        }
        let required = |var: &'static str| -> Result<String, EnvError> {
            let v = get(var).ok_or_else(|| EnvError {
                var,
                message: "not set (a multi-process worker needs RANK, WORLD_SIZE, LOCAL_RANK, \
                          LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TESSERA_RUN_ID and \
                          TESSERA_STORE_SECRET_FILE or TESSERA_STORE_SECRET; the launcher sets \
                          them all)"
                    .into(),
            })?;
            let v = v.trim().to_string();
            if v.is_empty() {
                return Err(EnvError {
                    var,
                    message: "is empty".into(),
                });
            }
            Ok(v)
        };
        let number = |var: &'static str, text: String| -> Result<usize, EnvError> {
            text.parse::<usize>().map_err(|_| EnvError {
                var,
                message: format!("'{text}' is not a non-negative integer"),
            })
        };
        let rank = number("RANK", required("RANK")?)?;
        let world_size = number("WORLD_SIZE", required("WORLD_SIZE")?)?;
        let local_rank = number("LOCAL_RANK", required("LOCAL_RANK")?)?;
        let local_world_size = number("LOCAL_WORLD_SIZE", required("LOCAL_WORLD_SIZE")?)?;
        if world_size == 0 {
            return Err(EnvError {
                var: "WORLD_SIZE",
                message: "must be ≥ 1".into(),
            });
        }
        if rank >= world_size {
            return Err(EnvError {
                var: "RANK",
                message: format!("{rank} must be < WORLD_SIZE = {world_size}"),
            });
        }
        if local_world_size == 0 || local_world_size > world_size {
            return Err(EnvError {
                var: "LOCAL_WORLD_SIZE",
                message: format!("{local_world_size} must be in [1, WORLD_SIZE = {world_size}]"),
            });
        }
        if local_rank >= local_world_size {
            return Err(EnvError {
                var: "LOCAL_RANK",
                message: format!("{local_rank} must be < LOCAL_WORLD_SIZE = {local_world_size}"),
            });
        }
        let master_addr = required("MASTER_ADDR")?;
        let port_text = required("MASTER_PORT")?;
        let master_port = match port_text.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(EnvError {
                    var: "MASTER_PORT",
                    message: format!("'{port_text}' is not a TCP port in [1, 65535]"),
                })
            }
        };
        let run_id = required("TESSERA_RUN_ID")?;
        check_run_id(&run_id).map_err(|message| EnvError {
            var: "TESSERA_RUN_ID",
            message,
        })?;
        let generation = match get("TESSERA_RESTART_COUNT") {
            None => 0,
            Some(t) => t.trim().parse::<u64>().map_err(|_| EnvError {
                var: "TESSERA_RESTART_COUNT",
                message: format!("'{t}' is not a non-negative integer"),
            })?,
        };
        let secret_var = if get(auth::SECRET_FILE_ENV).is_some() {
            auth::SECRET_FILE_ENV
        } else {
            auth::SECRET_ENV
        };
        let secret = Secret::from_lookup(&get)
            .map_err(|e| EnvError {
                var: secret_var,
                message: e.to_string(),
            })?
            .ok_or_else(|| EnvError {
                var: auth::SECRET_FILE_ENV,
                message: format!(
                    "not set, nor {}: the rendezvous store authenticates every frame with the \
                     run's secret (the launcher passes it; see docs/cluster.md)",
                    auth::SECRET_ENV
                ),
            })?;
        let launcher_pid = match get("TESSERA_LAUNCHER_PID") {
            None => None,
            Some(t) => Some(t.trim().parse::<u32>().map_err(|_| EnvError {
                var: "TESSERA_LAUNCHER_PID",
                message: format!("'{t}' is not a process id"),
            })?),
        };
        Ok(Some(WorkerEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            run_id,
            generation,
            secret,
            launcher_pid,
        }))
    }

    /// The run id and secret every connection to the store needs.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            run_id: self.run_id.clone(),
            secret: self.secret.clone(),
        }
    }

    /// `host:port` of the store.
    pub fn store_addr(&self) -> String {
        format_host_port(&self.master_addr, self.master_port)
    }
}

impl fmt::Display for WorkerEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} of {} (local {} of {}), store {}, run {}, generation {}",
            self.rank,
            self.world_size,
            self.local_rank,
            self.local_world_size,
            self.store_addr(),
            self.run_id,
            self.generation
        )
    }
}

/// `host:port`, with an IPv6 literal in brackets.
pub fn format_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The longest run id accepted.
pub const MAX_RUN_ID_LEN: usize = 128;

/// A run id is 1..=128 characters of `[A-Za-z0-9._-]` (it appears in file names and logs).
pub fn check_run_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_RUN_ID_LEN {
        return Err(format!(
            "run id '{id}' must have 1 to {MAX_RUN_ID_LEN} characters"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "run id '{id}' contains '{c}'; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<WorkerEnv>, EnvError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorkerEnv::from_lookup(|k| map.get(k).cloned())
    }

    const FULL: &[(&str, &str)] = &[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node01"),
        ("MASTER_PORT", "29500"),
        ("TESSERA_RUN_ID", "job-7"),
        ("TESSERA_STORE_SECRET", "0123456789abcdef0123456789abcdef"),
    ];

    fn with(over: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = FULL
            .iter()
            .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
            .copied()
            .collect();
        v.extend(over.iter().filter(|(_, val)| !val.is_empty()).copied());
        v
    }

    #[test]
    fn no_rank_and_no_world_size_is_a_single_process() {
        assert_eq!(env(&[("MASTER_ADDR", "x")]).unwrap(), None);
    }

    #[test]
    fn reads_every_variable() {
        let e = env(FULL).unwrap().unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.local_world_size),
            (3, 4, 1, 2)
        );
        assert_eq!(e.store_addr(), "node01:29500");
        assert_eq!((e.run_id.as_str(), e.generation), ("job-7", 0));
        let e = env(&with(&[("TESSERA_RESTART_COUNT", "2")]))
            .unwrap()
            .unwrap();
        assert_eq!(e.generation, 2);
    }

    #[test]
    fn errors_name_the_variable() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (&[("WORLD_SIZE", "2")], "RANK", "not set"),
            (&with(&[("MASTER_PORT", "")]), "MASTER_PORT", "not set"),
            (
                &with(&[("MASTER_PORT", "99999")]),
                "MASTER_PORT",
                "TCP port",
            ),
            (&with(&[("RANK", "4")]), "RANK", "< WORLD_SIZE = 4"),
            (&with(&[("RANK", "-1")]), "RANK", "non-negative"),
            (&with(&[("WORLD_SIZE", "0")]), "WORLD_SIZE", "≥ 1"),
            (
                &with(&[("LOCAL_RANK", "2")]),
                "LOCAL_RANK",
                "< LOCAL_WORLD_SIZE",
            ),
            (
                &with(&[("TESSERA_RUN_ID", "a b")]),
                "TESSERA_RUN_ID",
                "contains ' '",
            ),
            (
                &with(&[("TESSERA_RUN_ID", "")]),
                "TESSERA_RUN_ID",
                "not set",
            ),
            (
                &with(&[("TESSERA_RESTART_COUNT", "x")]),
                "TESSERA_RESTART_COUNT",
                "'x'",
            ),
            (
                &with(&[("TESSERA_STORE_SECRET", "")]),
                "TESSERA_STORE_SECRET_FILE",
                "not set, nor TESSERA_STORE_SECRET",
            ),
            (
                &with(&[("TESSERA_STORE_SECRET", "too short")]),
                "TESSERA_STORE_SECRET",
                "fewer than the 32 required",
            ),
            (
                &with(&[("TESSERA_STORE_SECRET_FILE", "/nonexistent/s")]),
                "TESSERA_STORE_SECRET_FILE",
                "set only one",
            ),
        ];
        for (pairs, var, text) in cases {
            let e = env(pairs).unwrap_err();
            assert_eq!(e.var, *var, "{e}");
            assert!(e.to_string().contains(text), "{e}");
        }
    }
}
