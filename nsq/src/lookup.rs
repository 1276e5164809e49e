//! nsqlookupd discovery: `GET /lookup?topic=<topic>` on an nsqlookupd HTTP address, and the
//! nsqd TCP addresses (`broadcast_address:tcp_port`) of its `producers`.
//!
//! A deliberately small HTTP/1.0 client (one request per connection, read to EOF, bounded
//! response): the bus asks a handful of lookupds once a minute, which does not justify an
//! HTTP library's build time. nsqlookupd (`nsqlookupd/http.go`) answers
//! `{"channels":[...],"producers":[{"broadcast_address":..,"tcp_port":..,...}]}`, or 404
//! `{"message":"TOPIC_NOT_FOUND"}` while no nsqd has the topic yet (read as "no producers").
//! The pre-1.0 enveloped form (`{"status_code":200,"data":{...}}`) is accepted too.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest lookup response read.
const MAX_RESPONSE: usize = 1024 * 1024;

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Connect, write or read failed.
    #[error("nsqlookupd I/O: {0}")]
    Io(#[from] std::io::Error),
    /// No answer within the timeout.
    #[error("nsqlookupd did not answer in time")]
    Timeout,
    /// Not an HTTP response we understand, or not the lookup JSON.
    #[error("bad nsqlookupd response: {0}")]
    Bad(String),
}

#[derive(Deserialize)]
struct Producer {
    broadcast_address: String,
    tcp_port: u16,
}

#[derive(Deserialize)]
struct Lookup {
    #[serde(default)]
    producers: Vec<Producer>,
}

#[derive(Deserialize)]
struct Enveloped {
    data: Lookup,
}

/// Asks the nsqlookupd at `http_addr` (`host:port`) which nsqd have `topic`; returns their
/// TCP addresses, sorted and deduplicated.
pub async fn lookup(
    http_addr: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<String>, LookupError> {
    tokio::time::timeout(timeout, lookup_inner(http_addr, topic))
        .await
        .map_err(|_| LookupError::Timeout)?
}

async fn lookup_inner(http_addr: &str, topic: &str) -> Result<Vec<String>, LookupError> {
    if !crate::codec::is_valid_name(topic) {
        return Err(LookupError::Bad(format!("invalid topic {topic:?}")));
    }
    let mut stream = TcpStream::connect(http_addr).await?;
    let request = format!(
        "GET /lookup?topic={topic} HTTP/1.0\r\nHost: {http_addr}\r\n\
         Accept: application/vnd.nsq; version=1.0\r\nUser-Agent: ferry-nsq\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut response)
        .await?;
    if response.len() > MAX_RESPONSE {
        return Err(LookupError::Bad("response over 1 MiB".into()));
    }
    parse_response(&response)
}

/// Parses a whole HTTP/1.x lookup response.
pub fn parse_response(response: &[u8]) -> Result<Vec<String>, LookupError> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| LookupError::Bad("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| LookupError::Bad("no status line".into()))?;
    if lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    }) {
        return Err(LookupError::Bad(
            "chunked response to an HTTP/1.0 request".into(),
        ));
    }
    match status {
        200 => {}
        404 => return Ok(Vec::new()),
        other => {
            return Err(LookupError::Bad(format!(
                "status {other}: {}",
                String::from_utf8_lossy(body)
            )));
        }
    }
    // The enveloped form first: the plain form's fields are all optional.
    let lookup = serde_json::from_slice::<Enveloped>(body)
        .map(|e| e.data)
        .or_else(|_| serde_json::from_slice::<Lookup>(body))
        .map_err(|e| LookupError::Bad(format!("lookup JSON: {e}")))?;
    let mut addrs: Vec<String> = lookup
        .producers
        .into_iter()
        .map(|p| format!("{}:{}", p.broadcast_address, p.tcp_port))
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nsqlookupd_answers() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n\r\n\
{\"channels\":[\"ch\"],\"producers\":[{\"remote_address\":\"127.0.0.1:5000\",\"hostname\":\"h\",\
\"broadcast_address\":\"10.0.0.2\",\"tcp_port\":4150,\"http_port\":4151,\"version\":\"1.3.0\"},\
{\"broadcast_address\":\"10.0.0.1\",\"tcp_port\":4150,\"http_port\":4151}]}";
        assert_eq!(
            parse_response(ok).unwrap(),
            vec!["10.0.0.1:4150".to_string(), "10.0.0.2:4150".to_string()]
        );
        let missing = b"HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"TOPIC_NOT_FOUND\"}";
        assert!(parse_response(missing).unwrap().is_empty());
        let old = b"HTTP/1.1 200 OK\r\n\r\n{\"status_code\":200,\"status_txt\":\"OK\",\
\"data\":{\"channels\":[],\"producers\":[{\"broadcast_address\":\"a\",\"tcp_port\":1}]}}";
        assert_eq!(parse_response(old).unwrap(), vec!["a:1".to_string()]);
        assert!(parse_response(b"HTTP/1.0 500 x\r\n\r\n{}").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n\r\nnot json").is_err());
    }
}
