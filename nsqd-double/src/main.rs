//! `ferry-nsqd-double`: runs the NSQ-protocol TEST DOUBLE as a process (for local clusters
//! when no real `nsqd` is on `PATH`). Prints its bound address on stdout, then serves until
//! SIGINT or SIGTERM.

use std::time::Duration;

use ferry_nsqd_double::DoubleConfig;

const HELP: &str = "ferry-nsqd-double: an NSQ-protocol TEST DOUBLE (in-memory nsqd stand-in for \
tests and local clusters; NOT a real nsqd, never for production)

USAGE: ferry-nsqd-double [--tcp-address ADDR] [--max-msg-size BYTES] [--msg-timeout-ms MS]

  --tcp-address ADDR     address to listen on (default 127.0.0.1:4150; port 0 picks one)
  --max-msg-size BYTES   like nsqd --max-msg-size (default 1048576)
  --msg-timeout-ms MS    like nsqd --msg-timeout (default 60000)

Prints one line `ferry-nsqd-double (TEST DOUBLE) listening on ADDR` once bound.";

fn main() {
    let mut addr = "127.0.0.1:4150".to_string();
    let mut config = DoubleConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value\n\n{HELP}");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--tcp-address" => addr = value("--tcp-address"),
            "--max-msg-size" => config.max_msg_size = parse(&value("--max-msg-size")),
            "--msg-timeout-ms" => {
                config.msg_timeout = Duration::from_millis(parse(&value("--msg-timeout-ms")))
            }
            "-h" | "--help" => {
                println!("{HELP}");
                return;
            }
            other => {
                eprintln!("unknown argument {other}\n\n{HELP}");
                std::process::exit(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ferry-nsqd-double: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        let bound = listener.local_addr().expect("bound");
        println!("ferry-nsqd-double (TEST DOUBLE) listening on {bound}");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        ferry_nsqd_double::run(listener, config, shutdown).await;
    });
}

fn parse<T: std::str::FromStr>(s: &str) -> T {
    s.parse().unwrap_or_else(|_| {
        eprintln!("not a number: {s}\n\n{HELP}");
        std::process::exit(2)
    })
}
