//! Spreading client connections over processes.
//!
//! One process may hold at most ~20,000 open files, so a scenario with more
//! connections than `--per-process` runs its clients in worker processes:
//! this binary re-executed as `ferry-bench worker`. The coordinator (the
//! process the user started) and each worker talk in JSON lines: the first
//! line to a worker is its [`WorkerSpec`], then the scenario's commands go
//! down stdin and its replies come up stdout (each wrapped in `Ok`/`Err`).
//! Worker stderr is the user's terminal.
//!
//! When one process is enough the single worker runs as a task of the
//! coordinator over in-memory channels, with the same code and messages.

use std::ops::Range;

use anyhow::{Context, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;

use crate::scenarios::{conns, direct, floor, group};

/// A worker's assignment.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// This worker's index, 0-based.
    pub index: usize,
    /// Number of workers in the run.
    pub workers: usize,
    /// What to do.
    pub job: Job,
}

/// The scenario-specific part of a [`WorkerSpec`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Job {
    /// `conns`.
    Conns(conns::Job),
    /// `direct`.
    Direct(direct::Job),
    /// `group`.
    Group(group::Job),
    /// `floor`, one phase.
    Floor(floor::Job),
}

/// Splits users `0..n` into contiguous slices of at most `per_process`.
pub fn slices(n: u32, per_process: u32) -> Vec<Range<u32>> {
    let workers = n.div_ceil(per_process.max(1)).max(1);
    let base = n / workers;
    let extra = n % workers;
    let mut out = Vec::with_capacity(workers as usize);
    let mut start = 0;
    for w in 0..workers {
        let len = base + u32::from(w < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// The worker's end of the conversation with the coordinator.
pub enum Io {
    /// In-process worker.
    Local {
        /// Commands from the coordinator.
        rx: mpsc::Receiver<String>,
        /// Replies to it.
        tx: mpsc::Sender<String>,
    },
    /// Worker process: stdin and stdout.
    Stdio {
        /// Command lines.
        lines: Lines<BufReader<tokio::io::Stdin>>,
        /// Reply lines.
        out: tokio::io::Stdout,
    },
}

impl Io {
    /// The next command.
    pub async fn recv<C: DeserializeOwned>(&mut self) -> anyhow::Result<C> {
        let line = match self {
            Io::Local { rx, .. } => rx.recv().await,
            Io::Stdio { lines, .. } => lines.next_line().await?,
        }
        .context("the coordinator went away")?;
        serde_json::from_str(&line).with_context(|| format!("bad command: {line}"))
    }

    /// Sends a successful reply.
    pub async fn reply<E: Serialize>(&mut self, reply: &E) -> anyhow::Result<()> {
        let line = serde_json::to_string(&Ok::<&E, String>(reply))?;
        self.send_line(line).await
    }

    async fn send_line(&mut self, line: String) -> anyhow::Result<()> {
        match self {
            Io::Local { tx, .. } => tx
                .send(line)
                .await
                .map_err(|_| anyhow!("the coordinator went away")),
            Io::Stdio { out, .. } => {
                out.write_all(line.as_bytes()).await?;
                out.write_all(b"\n").await?;
                out.flush().await?;
                Ok(())
            }
        }
    }
}

/// Runs one worker's job, reporting a failure to the coordinator.
async fn dispatch(spec: WorkerSpec, mut io: Io) -> anyhow::Result<()> {
    let index = spec.index;
    let result = match spec.job {
        Job::Conns(job) => conns::worker(job, &mut io).await,
        Job::Direct(job) => direct::worker(job, index, &mut io).await,
        Job::Group(job) => group::worker(job, index, &mut io).await,
        Job::Floor(job) => floor::worker(job, index, &mut io).await,
    };
    if let Err(e) = &result {
        let line = serde_json::to_string(&Err::<(), String>(format!("worker {index}: {e:#}")))?;
        let _ = io.send_line(line).await;
    }
    result
}

/// `ferry-bench worker`: reads the spec from stdin and runs it.
pub async fn run_stdio() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await?
        .context("no worker spec on stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("bad worker spec")?;
    let io = Io::Stdio {
        lines,
        out: tokio::io::stdout(),
    };
    dispatch(spec, io).await
}

/// The coordinator's end of one worker.
enum Link {
    Local {
        tx: mpsc::Sender<String>,
        rx: mpsc::Receiver<String>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
    Process {
        child: Box<Child>,
        stdin: Option<ChildStdin>,
        lines: Lines<BufReader<ChildStdout>>,
    },
}

impl Link {
    async fn send_line(&mut self, line: &str) -> anyhow::Result<()> {
        match self {
            Link::Local { tx, .. } => tx
                .send(line.to_owned())
                .await
                .map_err(|_| anyhow!("the worker task ended")),
            Link::Process { stdin, .. } => {
                let stdin = stdin.as_mut().context("worker stdin closed")?;
                stdin.write_all(line.as_bytes()).await?;
                stdin.write_all(b"\n").await?;
                stdin.flush().await?;
                Ok(())
            }
        }
    }

    async fn recv<E: DeserializeOwned>(&mut self) -> anyhow::Result<E> {
        let line = match self {
            Link::Local { rx, .. } => rx.recv().await,
            Link::Process { lines, .. } => lines.next_line().await?,
        }
        .context("the worker ended without replying")?;
        let reply: Result<E, String> =
            serde_json::from_str(&line).with_context(|| format!("bad worker reply: {line}"))?;
        reply.map_err(|e| anyhow!(e))
    }
}

/// The workers of one scenario (phase).
pub struct Pool {
    links: Vec<Link>,
    pids: Vec<u32>,
}

impl Pool {
    /// Starts one worker per job: in-process when there is one job,
    /// otherwise as child processes.
    pub async fn start(jobs: Vec<Job>) -> anyhow::Result<Pool> {
        let workers = jobs.len();
        let mut links = Vec::with_capacity(workers);
        let mut pids = Vec::new();
        if workers == 1 {
            let job = jobs.into_iter().next().expect("one job");
            let (cmd_tx, cmd_rx) = mpsc::channel(16);
            let (reply_tx, reply_rx) = mpsc::channel(16);
            let spec = WorkerSpec {
                index: 0,
                workers: 1,
                job,
            };
            let task = tokio::spawn(dispatch(
                spec,
                Io::Local {
                    rx: cmd_rx,
                    tx: reply_tx,
                },
            ));
            links.push(Link::Local {
                tx: cmd_tx,
                rx: reply_rx,
                task,
            });
        } else {
            let exe = std::env::current_exe().context("locating the ferry-bench executable")?;
            for (index, job) in jobs.into_iter().enumerate() {
                let mut child = tokio::process::Command::new(&exe)
                    .arg("worker")
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .context("starting a worker process")?;
                pids.push(child.id().context("worker pid")?);
                let stdin = child.stdin.take().context("worker stdin")?;
                let stdout = child.stdout.take().context("worker stdout")?;
                let mut link = Link::Process {
                    child: Box::new(child),
                    stdin: Some(stdin),
                    lines: BufReader::new(stdout).lines(),
                };
                let spec = WorkerSpec {
                    index,
                    workers,
                    job,
                };
                link.send_line(&serde_json::to_string(&spec)?).await?;
                links.push(link);
            }
        }
        Ok(Pool { links, pids })
    }

    /// Pids of worker processes (empty for an in-process worker).
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Sends a command to worker `i`.
    pub async fn send<C: Serialize>(&mut self, i: usize, cmd: &C) -> anyhow::Result<()> {
        let line = serde_json::to_string(cmd)?;
        self.links[i].send_line(&line).await
    }

    /// Sends a command to every worker.
    pub async fn broadcast<C: Serialize>(&mut self, cmd: &C) -> anyhow::Result<()> {
        let line = serde_json::to_string(cmd)?;
        for link in &mut self.links {
            link.send_line(&line).await?;
        }
        Ok(())
    }

    /// The next reply of worker `i`.
    pub async fn recv<E: DeserializeOwned>(&mut self, i: usize) -> anyhow::Result<E> {
        self.links[i].recv().await
    }

    /// The next reply of every worker, in worker order.
    pub async fn gather<E: DeserializeOwned>(&mut self) -> anyhow::Result<Vec<E>> {
        futures::future::try_join_all(self.links.iter_mut().map(|l| l.recv::<E>())).await
    }

    /// `broadcast` then `gather`.
    pub async fn ask<C: Serialize, E: DeserializeOwned>(
        &mut self,
        cmd: &C,
    ) -> anyhow::Result<Vec<E>> {
        self.broadcast(cmd).await?;
        self.gather().await
    }

    /// Closes every worker's input and waits for them to finish.
    pub async fn finish(self) -> anyhow::Result<()> {
        for link in self.links {
            match link {
                Link::Local { tx, task, .. } => {
                    drop(tx);
                    match task.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => bail!("{e:#}"),
                        Err(e) => bail!("worker task: {e}"),
                    }
                }
                Link::Process {
                    mut child, stdin, ..
                } => {
                    drop(stdin);
                    let status =
                        tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
                            .await
                            .context("a worker process did not exit")??;
                    anyhow::ensure!(status.success(), "a worker process failed: {status}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_everything_evenly() {
        assert_eq!(slices(10, 9000), vec![0..10]);
        assert_eq!(slices(0, 9000), vec![0..0]);
        let s = slices(18_000, 9000);
        assert_eq!(s, vec![0..9000, 9000..18_000]);
        let s = slices(18_001, 9000);
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().map(|r| r.len()).sum::<usize>(), 18_001);
        assert!(s.iter().all(|r| r.len() <= 9000));
        assert_eq!(s[0].start, 0);
        assert_eq!(s[2].end, 18_001);
    }
}
