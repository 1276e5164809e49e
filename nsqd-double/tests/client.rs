//! `ferry-nsq` (producer, consumer, connection) against the NSQ-protocol test double over real
//! loopback sockets. Tests synchronise on the double's counters (`wait_for`) and on what the
//! client hands out, never on sleeps; each is bounded by a timeout.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use ferry_nsq::connection::{Connection, ConnectionConfig, ConnectionError, Event};
use ferry_nsq::{Backoff, Consumer, ConsumerConfig, Producer, ProducerConfig, PublishError, Topic};
use ferry_nsqd_double::{DoubleConfig, NsqdDouble};

async fn bounded<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test took too long")
}

fn fast_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
    }
}

fn producer(d: &NsqdDouble) -> Producer {
    let mut config = ProducerConfig::new(vec![d.addr().to_string()]);
    config.backoff = fast_backoff();
    Producer::start(config)
}

fn consumer_config(d: &[&NsqdDouble], topic: &str, max_in_flight: u32) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(
        d.iter().map(|d| d.addr().to_string()).collect(),
        topic,
        "ch",
    );
    config.max_in_flight = max_in_flight;
    config.backoff = fast_backoff();
    config
}

async fn double() -> NsqdDouble {
    NsqdDouble::start(DoubleConfig::default()).await.unwrap()
}

#[tokio::test]
async fn publish_consume_fin() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t1").unwrap();
        let p = producer(&d);
        let mut c = Consumer::start(consumer_config(&[&d], "t1", 8)).unwrap();
        p.publish(&topic, Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let m = c.recv().await.unwrap();
        assert_eq!(m.body().as_ref(), b"hello");
        assert_eq!(m.attempts(), 1);
        m.fin().await.unwrap();
        d.wait_for(|s| s.finished == 1).await;
        assert_eq!(d.depth("t1", "ch").in_flight, 0);
        assert_eq!(d.stats().command("PUB"), 1);
    })
    .await
}

#[tokio::test]
async fn req_redelivers_with_attempts_two_and_touch_is_accepted() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t2").unwrap();
        let p = producer(&d);
        let mut c = Consumer::start(consumer_config(&[&d], "t2", 8)).unwrap();
        p.publish(&topic, Bytes::from_static(b"again"))
            .await
            .unwrap();
        let first = c.recv().await.unwrap();
        let id = first.id();
        first.req(Duration::ZERO).await.unwrap();
        let second = c.recv().await.unwrap();
        assert_eq!(second.id(), id);
        assert_eq!(second.attempts(), 2);
        second.touch().await.unwrap();
        d.wait_for(|s| s.touched == 1).await;
        second.fin().await.unwrap();
        let s = d.wait_for(|s| s.finished == 1).await;
        assert_eq!(s.requeued, 1);
        assert_eq!(c.stats().reqs.load(std::sync::atomic::Ordering::Relaxed), 1);
    })
    .await
}

#[tokio::test]
async fn msg_timeout_redelivers_an_unfinished_message() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t3").unwrap();
        let p = producer(&d);
        let mut config = consumer_config(&[&d], "t3", 8);
        config.connection.msg_timeout = Some(Duration::from_millis(1000));
        let mut c = Consumer::start(config).unwrap();
        p.publish(&topic, Bytes::from_static(b"slow"))
            .await
            .unwrap();
        let held = c.recv().await.unwrap();
        let again = c.recv().await.unwrap();
        assert_eq!(again.id(), held.id());
        assert_eq!(again.attempts(), 2);
        assert_eq!(d.stats().timed_out, 1);
        again.fin().await.unwrap();
        // The stale handle's FIN gets a non-fatal E_FIN_FAILED; the connection stays.
        held.fin().await.unwrap();
        d.wait_for(|s| s.command("FIN") == 2).await;
        p.publish(&topic, Bytes::from_static(b"after"))
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap().body().as_ref(), b"after");
        assert_eq!(
            d.stats().connections,
            2,
            "no reconnect: E_FIN_FAILED is not fatal"
        );
    })
    .await
}

#[tokio::test]
async fn heartbeats_are_answered_and_idle_connections_live_on() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t4").unwrap();
        let mut pconfig = ProducerConfig::new(vec![d.addr().to_string()]);
        pconfig.connection.heartbeat_interval = Duration::from_secs(1);
        let p = Producer::start(pconfig);
        let mut config = consumer_config(&[&d], "t4", 8);
        config.connection.heartbeat_interval = Duration::from_secs(1);
        let mut c = Consumer::start(config).unwrap();
        p.publish(&topic, Bytes::from_static(b"x")).await.unwrap();
        c.recv().await.unwrap().fin().await.unwrap();
        // 3 heartbeats on each connection (6 s of silence would have closed them at 2 s).
        d.wait_for(|s| s.heartbeats >= 6 && s.command("NOP") >= 6)
            .await;
        let s = d.stats();
        assert_eq!(s.connections, 2);
        assert_eq!(s.open_connections, 2);
        p.publish(&topic, Bytes::from_static(b"y")).await.unwrap();
        assert_eq!(c.recv().await.unwrap().body().as_ref(), b"y");
    })
    .await
}

#[tokio::test]
async fn silent_connection_is_closed_after_two_heartbeat_intervals() {
    bounded(20, async {
        let d = double().await;
        let config = ConnectionConfig {
            heartbeat_interval: Duration::from_secs(1),
            ..ConnectionConfig::default()
        };
        let mut conn = Connection::connect(&d.addr().to_string(), &config)
            .await
            .unwrap();
        assert_eq!(conn.settings().max_rdy_count, 2500);
        conn.subscribe("t5", "ch").await.unwrap();
        let start = tokio::time::Instant::now();
        let mut heartbeats = 0;
        // Read without answering: what nsqd does to a client that stops talking.
        let end = loop {
            match conn.read_frame().await {
                Ok(f) if f.is_heartbeat() => heartbeats += 1,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => break e,
            }
        };
        assert!(matches!(end, ConnectionError::Closed), "{end}");
        assert!((1..=2).contains(&heartbeats));
        let after = start.elapsed();
        assert!(
            after >= Duration::from_millis(1900) && after < Duration::from_millis(3500),
            "{after:?}"
        );
    })
    .await
}

#[tokio::test]
async fn fatal_error_frames_are_typed_and_non_fatal_ones_are_events() {
    bounded(20, async {
        let d = double().await;
        let addr = d.addr().to_string();
        let config = ConnectionConfig::default();
        let mut conn = Connection::connect(&addr, &config).await.unwrap();
        conn.subscribe("t6", "ch").await.unwrap();
        conn.send(&ferry_nsq::Command::Fin(ferry_nsq::MessageId(
            *b"0123456789abcdef",
        )))
        .await
        .unwrap();
        match conn.recv().await.unwrap() {
            Event::Error(e) => {
                assert_eq!(
                    e.text(),
                    "E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight"
                );
                assert!(!e.is_fatal());
            }
            other => panic!("{other:?}"),
        }
        // SUB twice: fatal E_INVALID, then the close.
        conn.write_buffer().extend_from_slice(b"SUB t6 ch2\n");
        conn.flush().await.unwrap();
        match conn.recv().await {
            Err(ConnectionError::Server(e)) => {
                assert_eq!(e.text(), "E_INVALID cannot SUB in current state")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            conn.read_frame().await,
            Err(ConnectionError::Closed)
        ));
    })
    .await
}

#[tokio::test]
async fn both_sides_reconnect_after_the_double_drops_every_connection() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t7").unwrap();
        let p = producer(&d);
        let mut c = Consumer::start(consumer_config(&[&d], "t7", 8)).unwrap();
        p.publish(&topic, Bytes::from_static(b"before"))
            .await
            .unwrap();
        c.recv().await.unwrap().fin().await.unwrap();
        d.wait_for(|s| s.finished == 1).await;
        d.drop_connections();
        d.wait_for(|s| s.connections >= 3 && s.command("SUB") >= 2)
            .await;
        // The producer may notice the drop only when it writes: the first publish after the
        // drop can fail as Disconnected (outcome unknown), and the next goes out reconnected.
        let mut sent = false;
        for _ in 0..3 {
            match p.publish(&topic, Bytes::from_static(b"after")).await {
                Ok(()) => {
                    sent = true;
                    break;
                }
                Err(PublishError::Disconnected) => continue,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(sent);
        let m = c.recv().await.unwrap();
        assert_eq!(m.body().as_ref(), b"after");
        m.fin().await.unwrap();
        assert!(
            p.stats()
                .connects
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 2
        );
        assert_eq!(
            c.stats()
                .connects
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    })
    .await
}

#[tokio::test]
async fn the_producer_says_whether_it_holds_an_nsqd_connection() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t-connected").unwrap();
        let p = producer(&d);
        assert!(
            !p.stats().connected(),
            "nothing connected before the first connect"
        );
        p.publish(&topic, Bytes::from_static(b"x")).await.unwrap();
        assert!(p.stats().connected());
        d.shutdown().await;
        // The idle producer reads its connection, sees it close and cannot
        // reconnect to a stopped nsqd.
        while p.stats().connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test]
async fn duplicate_delivery_is_seen_twice() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t8").unwrap();
        let p = producer(&d);
        let mut c = Consumer::start(consumer_config(&[&d], "t8", 8)).unwrap();
        d.set_duplicate_delivery(true);
        p.publish(&topic, Bytes::from_static(b"twice"))
            .await
            .unwrap();
        let a = c.recv().await.unwrap();
        let b = c.recv().await.unwrap();
        assert_eq!(a.body(), b.body());
        assert_ne!(a.id(), b.id());
        a.fin().await.unwrap();
        b.fin().await.unwrap();
        d.wait_for(|s| s.finished == 2).await;
        assert_eq!(d.stats().published, 1);
    })
    .await
}

#[tokio::test]
async fn lost_in_flight_messages_are_gone_and_the_consumer_goes_on() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t9").unwrap();
        let p = producer(&d);
        let mut c = Consumer::start(consumer_config(&[&d], "t9", 8)).unwrap();
        p.publish(&topic, Bytes::from_static(b"doomed"))
            .await
            .unwrap();
        let m = c.recv().await.unwrap();
        assert_eq!(d.lose_in_flight(), 1);
        m.fin().await.unwrap(); // E_FIN_FAILED, non-fatal
        p.publish(&topic, Bytes::from_static(b"next"))
            .await
            .unwrap();
        let n = c.recv().await.unwrap();
        assert_eq!(n.body().as_ref(), b"next");
        assert_eq!(n.attempts(), 1);
        n.fin().await.unwrap();
        let s = d.wait_for(|s| s.finished == 1).await;
        assert_eq!(s.lost, 1);
        assert_eq!(s.connections, 2);
    })
    .await
}

#[tokio::test]
async fn rdy_caps_messages_in_flight_and_set_max_in_flight_reissues_it() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t10").unwrap();
        let p = producer(&d);
        let mut c = Consumer::start(consumer_config(&[&d], "t10", 2)).unwrap();
        for i in 0..5u8 {
            p.publish(&topic, Bytes::from(vec![b'0' + i]))
                .await
                .unwrap();
        }
        let a = c.recv().await.unwrap();
        let b = c.recv().await.unwrap();
        d.wait_for_depth("t10", "ch", |x| x.in_flight == 2 && x.queued == 3)
            .await;
        a.fin().await.unwrap();
        let third = c.recv().await.unwrap();
        assert_eq!(third.body().as_ref(), b"2");
        d.wait_for_depth("t10", "ch", |x| x.in_flight == 2 && x.queued == 2)
            .await;
        // Pause, then resume with room for everything.
        c.set_max_in_flight(0);
        d.wait_for(|s| s.command("RDY") == 2).await;
        b.fin().await.unwrap();
        third.fin().await.unwrap();
        d.wait_for_depth("t10", "ch", |x| x.in_flight == 0 && x.queued == 2)
            .await;
        c.set_max_in_flight(10);
        for _ in 0..2 {
            c.recv().await.unwrap().fin().await.unwrap();
        }
        d.wait_for(|s| s.finished == 5).await;
    })
    .await
}

#[tokio::test]
async fn mpub_batches_under_load_and_one_pub_when_idle() {
    bounded(30, async {
        let d = double().await;
        let topic = Topic::new("t11").unwrap();
        let p = producer(&d);
        // Idle: one PUB.
        p.publish(&topic, Bytes::from_static(b"first"))
            .await
            .unwrap();
        assert_eq!(d.stats().command("PUB"), 1);
        // Load: 2000 queued at once (the queue holds 4096) go out in few commands.
        let mut receipts = Vec::new();
        for i in 0..2000u32 {
            receipts.push(
                p.enqueue(&topic, Bytes::from(i.to_be_bytes().to_vec()))
                    .await
                    .unwrap(),
            );
        }
        for r in receipts {
            r.await.unwrap();
        }
        let s = d.stats();
        assert_eq!(s.published, 2001);
        let commands = s.command("PUB") + s.command("MPUB");
        assert!(s.command("MPUB") >= 1);
        assert!(commands < 100, "{commands} commands for 2001 messages");
        // Every message arrives, in order.
        let mut c = Consumer::start(consumer_config(&[&d], "t11", 100)).unwrap();
        assert_eq!(c.recv().await.unwrap().body().as_ref(), b"first");
        for i in 0..2000u32 {
            let m = c.recv().await.unwrap();
            assert_eq!(m.body().as_ref(), &i.to_be_bytes());
            m.fin().await.unwrap();
        }
    })
    .await
}

#[tokio::test]
async fn publish_errors_are_typed() {
    bounded(20, async {
        let d = NsqdDouble::start(DoubleConfig {
            max_msg_size: 1024,
            ..DoubleConfig::default()
        })
        .await
        .unwrap();
        assert!(matches!(
            Topic::new("bad!topic"),
            Err(PublishError::BadTopic(_))
        ));
        let topic = Topic::new("t12").unwrap();
        let mut config = ProducerConfig::new(vec![d.addr().to_string()]);
        config.backoff = fast_backoff();
        // Misconfigured on purpose: we think nsqd takes 2048 bytes, it takes 1024.
        config.connection.max_msg_size = 2048;
        let p = Producer::start(config);
        assert_eq!(
            p.publish(&topic, Bytes::new()).await,
            Err(PublishError::EmptyBody)
        );
        assert!(matches!(
            p.publish(&topic, Bytes::from(vec![b'x'; 4096])).await,
            Err(PublishError::TooBig {
                len: 4096,
                max: 2048
            })
        ));
        assert_eq!(
            p.publish(&topic, Bytes::from(vec![b'x'; 1500])).await,
            Err(PublishError::Rejected(
                "E_BAD_MESSAGE PUB message too big 1500 > 1024".into()
            ))
        );
        // The connection was closed by the fatal error; the producer reconnects.
        p.publish(&topic, Bytes::from(vec![b'x'; 1024]))
            .await
            .unwrap();
        assert!(d.stats().connections >= 2);
    })
    .await
}

#[tokio::test]
async fn consumer_reads_from_several_nsqd() {
    bounded(20, async {
        let d1 = double().await;
        let d2 = double().await;
        let topic = Topic::new("t13").unwrap();
        let p1 = producer(&d1);
        let p2 = producer(&d2);
        let mut c = Consumer::start(consumer_config(&[&d1, &d2], "t13", 8)).unwrap();
        p1.publish(&topic, Bytes::from_static(b"one"))
            .await
            .unwrap();
        p2.publish(&topic, Bytes::from_static(b"two"))
            .await
            .unwrap();
        let mut got = vec![];
        for _ in 0..2 {
            let m = c.recv().await.unwrap();
            got.push(m.body().clone());
            m.fin().await.unwrap();
        }
        got.sort();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")]
        );
        d1.wait_for(|s| s.finished == 1).await;
        d2.wait_for(|s| s.finished == 1).await;
    })
    .await
}

#[tokio::test]
async fn delivery_delay_and_lost_queue() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t14").unwrap();
        let p = producer(&d);
        let mut c = Consumer::start(consumer_config(&[&d], "t14", 8)).unwrap();
        d.set_delivery_delay(Duration::from_millis(300));
        let sent = tokio::time::Instant::now();
        p.publish(&topic, Bytes::from_static(b"late"))
            .await
            .unwrap();
        let m = c.recv().await.unwrap();
        assert!(sent.elapsed() >= Duration::from_millis(300));
        m.fin().await.unwrap();
        // A long delay, then the queue is lost: the message never arrives.
        d.set_delivery_delay(Duration::from_secs(3600));
        p.publish(&topic, Bytes::from_static(b"never"))
            .await
            .unwrap();
        d.wait_for_depth("t14", "ch", |x| x.deferred == 1).await;
        assert_eq!(d.lose_queued(), 1);
        d.set_delivery_delay(Duration::ZERO);
        p.publish(&topic, Bytes::from_static(b"now")).await.unwrap();
        assert_eq!(c.recv().await.unwrap().body().as_ref(), b"now");
    })
    .await
}

#[tokio::test]
async fn dropped_delivery_is_requeued() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t15").unwrap();
        let p = producer(&d);
        let mut config = consumer_config(&[&d], "t15", 8);
        config.requeue_delay = Duration::ZERO;
        let mut c = Consumer::start(config).unwrap();
        p.publish(&topic, Bytes::from_static(b"dropped"))
            .await
            .unwrap();
        drop(c.recv().await.unwrap());
        let again = c.recv().await.unwrap();
        assert_eq!(again.attempts(), 2);
        again.fin().await.unwrap();
    })
    .await
}

/// A stand-in nsqlookupd for one test (not part of the double): answers every
/// `GET /lookup?topic=` with nsqlookupd's JSON naming the nsqd currently in `nsqd`, or its 404
/// while there are none.
async fn fake_lookupd(
    nsqd: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            while !req.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 256];
                let n = s.read(&mut b).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&b[..n]);
            }
            assert!(req.starts_with(b"GET /lookup?topic=t16 HTTP/1.0\r\n"));
            let producers: Vec<String> = nsqd
                .lock()
                .unwrap()
                .iter()
                .map(|a| {
                    format!(
                        "{{\"remote_address\":\"{a}\",\"hostname\":\"h\",\"broadcast_address\":\"{}\",\
                         \"tcp_port\":{},\"http_port\":4151,\"version\":\"1.3.0\"}}",
                        a.ip(),
                        a.port()
                    )
                })
                .collect();
            let response = if producers.is_empty() {
                "HTTP/1.0 404 Not Found\r\nContent-Type: application/json; charset=utf-8\r\n\r\n\
                 {\"message\":\"TOPIC_NOT_FOUND\"}"
                    .to_string()
            } else {
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n\r\n\
                     {{\"channels\":[\"ch\"],\"producers\":[{}]}}",
                    producers.join(",")
                )
            };
            let _ = s.write_all(response.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    addr
}

#[tokio::test]
async fn consumer_discovers_nsqd_through_nsqlookupd() {
    bounded(20, async {
        let d1 = double().await;
        let d2 = double().await;
        let listed = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let lookupd = fake_lookupd(listed.clone()).await;
        let mut config = consumer_config(&[], "t16", 8);
        config.lookupd_http_addresses = vec![lookupd.to_string()];
        config.lookupd_poll_interval = Duration::from_millis(50);
        let mut c = Consumer::start(config).unwrap();
        let topic = Topic::new("t16").unwrap();
        // No nsqd has the topic yet (404), then one, then two.
        listed.lock().unwrap().push(d1.addr());
        producer(&d1)
            .publish(&topic, Bytes::from_static(b"one"))
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap().body().as_ref(), b"one");
        listed.lock().unwrap().push(d2.addr());
        producer(&d2)
            .publish(&topic, Bytes::from_static(b"two"))
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap().body().as_ref(), b"two");
        let discovered = c
            .stats()
            .discovered
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(discovered, 2);
        // RDY was re-split between the two connections (8 = 4 + 4).
        d1.wait_for(|s| s.command("RDY") >= 2).await;
    })
    .await
}

#[tokio::test]
async fn failed_commit_requeues_with_backoff_and_touch_knows_the_timeout() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t17").unwrap();
        let p = producer(&d);
        let mut config = consumer_config(&[&d], "t17", 8);
        config.connection.msg_timeout = Some(Duration::from_secs(5));
        config.requeue_delay = Duration::from_millis(100);
        let mut c = Consumer::start(config).unwrap();
        p.publish(&topic, Bytes::from_static(b"retry"))
            .await
            .unwrap();
        let m = c.recv().await.unwrap();
        assert_eq!(m.msg_timeout(), Duration::from_secs(5));
        let start = tokio::time::Instant::now();
        m.req_backoff().await.unwrap(); // 100 ms x 1 attempt
        let again = c.recv().await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(again.attempts(), 2);
        again.fin().await.unwrap();
        d.wait_for(|s| s.finished == 1).await;
    })
    .await
}

#[tokio::test]
async fn batches_respect_topic_runs_and_caps() {
    bounded(30, async {
        let d = double().await;
        let a = Topic::new("t18a").unwrap();
        let b = Topic::new("t18b").unwrap();
        let mut config = ProducerConfig::new(vec![d.addr().to_string()]);
        config.max_batch_messages = 7;
        // Count (4) + 3 x (4 + 100): at most 3 bodies of 100 bytes per MPUB.
        config.max_body_size = 4 + 3 * 104;
        let p = Producer::start(config);
        let mut receipts = Vec::new();
        for i in 0..300u32 {
            let topic = if (i / 50) % 2 == 0 { &a } else { &b };
            let body = if i < 150 {
                vec![1u8; 100]
            } else {
                vec![2u8; 10]
            };
            receipts.push(p.enqueue(topic, Bytes::from(body)).await.unwrap());
        }
        for r in receipts {
            r.await.unwrap();
        }
        let s = d.stats();
        assert_eq!(s.published, 300);
        // 150 big bodies need >= 50 commands, 150 small ones >= 150/7.
        assert!(s.command("PUB") + s.command("MPUB") >= 50 + 22, "{s:?}");
        assert!(s.command("MPUB") >= 1);
    })
    .await
}

#[tokio::test]
async fn a_full_queue_pushes_back_and_queued_publishes_wait_for_nsqd() {
    bounded(20, async {
        // An address with nothing listening yet.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut config = ProducerConfig::new(vec![addr.to_string()]);
        config.queue_capacity = 4;
        config.backoff = fast_backoff();
        let p = Producer::start(config);
        let topic = Topic::new("t19").unwrap();
        let mut receipts = Vec::new();
        for i in 0..4u8 {
            receipts.push(p.try_enqueue(&topic, Bytes::from(vec![i + 1])).unwrap());
        }
        assert_eq!(
            p.try_enqueue(&topic, Bytes::from_static(b"x")).unwrap_err(),
            PublishError::QueueFull
        );
        let mut blocked = Box::pin(p.enqueue(&topic, Bytes::from_static(b"5")));
        assert!(futures::poll!(blocked.as_mut()).is_pending());
        // nsqd comes up on that address: everything queued goes out.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let d = NsqdDouble::start_on(listener, DoubleConfig::default()).unwrap();
        receipts.push(blocked.await.unwrap());
        for r in receipts {
            r.await.unwrap();
        }
        assert_eq!(d.stats().published, 5);
    })
    .await
}

#[tokio::test]
async fn the_binary_says_it_is_a_test_double_and_serves() {
    bounded(20, async {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry-nsqd-double"))
            .args(["--tcp-address", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next_line().await.unwrap().unwrap();
        assert!(line.contains("TEST DOUBLE"), "{line}");
        let addr = line.rsplit(' ').next().unwrap().to_string();
        let p = Producer::start(ProducerConfig::new(vec![addr]));
        p.publish(&Topic::new("t20").unwrap(), Bytes::from_static(b"x"))
            .await
            .unwrap();
        child.kill().await.unwrap();
    })
    .await
}

/// Not a correctness test: how fast producer -> double -> consumer goes on this machine
/// (`cargo test --release -p ferry-nsqd-double --test client throughput -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    bounded(120, async {
        let d = double().await;
        let topic = Topic::new("bench").unwrap();
        let p = producer(&d);
        let mut c = Consumer::start(consumer_config(&[&d], "bench", 2500)).unwrap();
        let n = 200_000u32;
        let body = Bytes::from(vec![b'x'; 200]);
        let start = std::time::Instant::now();
        let consume = tokio::spawn(async move {
            for _ in 0..n {
                c.recv().await.unwrap().fin().await.unwrap();
            }
        });
        let mut receipts = std::collections::VecDeque::new();
        for _ in 0..n {
            receipts.push_back(p.enqueue(&topic, body.clone()).await.unwrap());
            if receipts.len() > 4000 {
                receipts.pop_front().unwrap().await.unwrap();
            }
        }
        for r in receipts {
            r.await.unwrap();
        }
        let published = start.elapsed();
        consume.await.unwrap();
        let all = start.elapsed();
        let s = d.stats();
        println!(
            "{n} x 200 B: published in {published:?} ({:.0}/s, {} PUB + {} MPUB), consumed+FINed in {all:?} ({:.0}/s)",
            n as f64 / published.as_secs_f64(),
            s.command("PUB"),
            s.command("MPUB"),
            n as f64 / all.as_secs_f64()
        );
    })
    .await
}

/// A consumer shutting down sends CLS, but a message the application holds
/// can still be FINed after its commit: the session ends only once nothing
/// is out (nsqd answers CLS with CLOSE_WAIT and keeps taking FIN/REQ).
#[tokio::test]
async fn shutdown_waits_for_the_fin_of_a_message_the_application_holds() {
    bounded(20, async {
        let d = double().await;
        let topic = Topic::new("t_cls").unwrap();
        let p = producer(&d);
        let mut c = Consumer::start(consumer_config(&[&d], "t_cls", 8)).unwrap();
        p.publish(&topic, Bytes::from_static(b"held"))
            .await
            .unwrap();
        let held = c.recv().await.unwrap();
        let shutting_down = tokio::spawn(c.shutdown());
        d.wait_for(|s| s.command("CLS") == 1).await;
        assert!(
            !shutting_down.is_finished(),
            "the session must wait for the held message's answer"
        );
        held.fin().await.expect("FIN after CLS still reaches nsqd");
        d.wait_for(|s| s.finished == 1).await;
        shutting_down.await.unwrap();
        assert_eq!(d.depth("t_cls", "ch").in_flight, 0);
        assert_eq!(d.stats().requeued, 0);
    })
    .await
}
