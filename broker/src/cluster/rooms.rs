//! Rooms shared through Redis (`--cluster`): the room log, its numbering and presence.
//!
//! In: room messages and join/leave requests from this node's rooms service. Out: each
//! room's messages numbered 1, 2, 3 by one Lua script that takes the next `x-seq`, keeps
//! the message in the room's stream and publishes it on the room's channel in one step
//! (so that the numbering, the history and what every node hears agree), and presence kept
//! per session so that join and leave notices are posted exactly once, however many nodes
//! and sessions a user has, and whatever is retried.
//!
//! Keys, under the cluster prefix `P`: `P room:<room>` (hash: `seq`, `bytes`), `P room:<room>:log`
//! (stream, entry `<seq>-0` with field `m`: the message as a STOMP 1.2 frame without its
//! command line), `P room:<room>:members` (hash: user → sessions anywhere), `P rooms` (set
//! of room names), `P presence:<node>` (hash: `<room>\n<session>\n<subscription>` → user,
//! one per joined subscription on that node), `P member:<node>` (the node's incarnation:
//! gone once other nodes declared it dead). Channel: `P topic:room.<room>`, the same one a
//! topic pattern's glob covers, so that `/topic/room.*` watchers on any node hear rooms too.
//!
//! Writes go through one task in order, pipelined (one `SCRIPT LOAD` per batch, one
//! `EVALSHA` per message). Joins and leaves are idempotent and retried until Redis takes
//! them; an append is retried only when Redis surely did not get it (the connection was
//! refused), since a second append would number the message twice.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use redis::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::{Cluster, decode_bus_message, encode_bus_frame};
use crate::message::{CLEARED_HEADER, Publish};
use crate::outbox::End;
use crate::receipts::Answer;

/// The one script for every room write, dispatched on `ARGV[1]`.
///
/// KEYS: 1 room hash, 2 room log, 3 set of rooms, 4 room members, 5 a node's presence,
/// 6 the fence: this node's member key (join, leave) or the dead node's heartbeat (reap).
/// ARGV: 1 op, 2 room, 3 notice or message (frame without command line, no `x-seq`),
/// 4 most messages kept, 5 most bytes kept, 6 channel, 7 node, 8 presence field, 9 user,
/// 10 incarnation (join, leave) or `force` (reap of this node's own previous life).
///
/// Nothing is written before every check passed and the stream took the message (the
/// only write that can fail on its own): the next `x-seq` is never taken without its
/// message being kept.
const ROOM_SCRIPT: &str = r"
local function append(room, rest, max_msgs, max_bytes, channel, node)
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') + 1
  redis.call('XADD', KEYS[2], seq .. '-0', 'm', rest)
  redis.call('HSET', KEYS[1], 'seq', seq)
  local bytes = redis.call('HINCRBY', KEYS[1], 'bytes', string.len(rest))
  local len = redis.call('XLEN', KEYS[2])
  while len > 0 and (len > max_msgs or bytes > max_bytes) do
    local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
    redis.call('XDEL', KEYS[2], oldest[1])
    bytes = redis.call('HINCRBY', KEYS[1], 'bytes', -string.len(oldest[2][2]))
    len = len - 1
  end
  redis.call('SADD', KEYS[3], room)
  redis.call('PUBLISH', channel, node .. '\nMESSAGE\nx-seq:' .. seq .. '\n' .. rest)
  return seq
end

local function leave()
  if redis.call('HEXISTS', KEYS[5], ARGV[8]) == 0 then return 0 end
  local seq = 0
  if tonumber(redis.call('HGET', KEYS[4], ARGV[9]) or '0') <= 1 then
    seq = append(ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7])
  end
  redis.call('HDEL', KEYS[5], ARGV[8])
  if redis.call('HINCRBY', KEYS[4], ARGV[9], -1) <= 0 then redis.call('HDEL', KEYS[4], ARGV[9]) end
  return seq
end

local op = ARGV[1]
if op == 'append' then
  return append(ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7])
end
if op == 'clear' then
  -- An operator clears the kept messages (KEYS 1 and 2 only). Numbering goes on; every node
  -- hears, in order with the room's messages, up to which x-seq its copy drops (header
  -- x-stoa-cleared, message.rs's CLEARED_HEADER). -1 for a room Redis does not know, else
  -- how many messages went.
  local seq = redis.call('HGET', KEYS[1], 'seq')
  if not seq then return -1 end
  local cleared = redis.call('XLEN', KEYS[2])
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'bytes', 0)
  redis.call('PUBLISH', ARGV[6], ARGV[7] .. '\nMESSAGE\nx-stoa-cleared:' .. seq .. '\n' .. ARGV[3])
  return cleared
end
if op == 'reap' then
  if ARGV[10] ~= 'force' and redis.call('EXISTS', KEYS[6]) == 1 then return 0 end
  return leave()
end
if redis.call('GET', KEYS[6]) ~= ARGV[10] then
  return redis.error_reply('FENCED this node is no longer a member of the cluster')
end
if op == 'leave' then return leave() end
if op == 'join' then
  if redis.call('HEXISTS', KEYS[5], ARGV[8]) == 1 then return 0 end
  local seq = 0
  if tonumber(redis.call('HGET', KEYS[4], ARGV[9]) or '0') <= 0 then
    seq = append(ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7])
  end
  redis.call('HSET', KEYS[5], ARGV[8], ARGV[9])
  redis.call('HINCRBY', KEYS[4], ARGV[9], 1)
  redis.call('SADD', KEYS[3], ARGV[2])
  return seq
end
return redis.error_reply('ERR unknown room operation')
";

/// How much history each room keeps in Redis (`--room-history`, `--room-history-bytes`).
#[derive(Debug, Clone, Copy)]
pub struct RoomLimits {
    /// Most messages per room.
    pub messages: usize,
    /// Most bytes per room (of the kept frames).
    pub bytes: usize,
}

/// A room message as Redis numbered it.
#[derive(Debug)]
pub struct Numbered {
    /// Its `x-seq`.
    pub seq: u64,
    /// The message, `x-seq` header first.
    pub publish: Publish,
}

/// A room as Redis holds it, read in one step.
#[derive(Debug, Default)]
pub struct Synced {
    /// The newest `x-seq` (0 for a room never used).
    pub seq: u64,
    /// The users present anywhere.
    pub members: Vec<String>,
    /// The newest kept messages, oldest first.
    pub history: Vec<Numbered>,
}

/// One room in the cluster-wide list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomState {
    /// Its name.
    pub room: String,
    /// The users present anywhere, by name.
    pub members: Vec<String>,
    /// Its newest `x-seq`.
    pub last_seq: u64,
}

/// What to do with one write.
#[derive(Debug)]
enum Op {
    /// Number, keep and publish a message; the answer carries its `x-seq`.
    Append { answer: Answer },
    /// Note a subscription's presence, posting the join notice on the user's first.
    Join {
        field: String,
        user: String,
        answer: Answer,
    },
    /// Take it back, posting the leave notice on the user's last.
    Leave { field: String, user: String },
}

#[derive(Debug)]
struct Write {
    room: Arc<str>,
    /// The message or notice.
    rest: Bytes,
    op: Op,
    /// When it stops being retried.
    deadline: Instant,
}

/// The rooms' side of the cluster.
#[derive(Debug)]
pub struct RoomBus {
    cluster: Arc<Cluster>,
    limits: RoomLimits,
    script: redis::Script,
    writes: mpsc::UnboundedSender<Write>,
    writes_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Write>>>,
}

/// A message as the room log keeps it: a STOMP 1.2 frame without its command line.
pub fn log_entry(publish: &Publish) -> Bytes {
    let frame = encode_bus_frame(publish);
    frame.slice("MESSAGE\n".len().min(frame.len())..)
}

fn number(seq: u64, rest: &[u8]) -> Option<Numbered> {
    let mut payload = BytesMut::with_capacity(rest.len() + 32);
    payload.extend_from_slice(b"\nMESSAGE\nx-seq:");
    payload.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    payload.extend_from_slice(b"\n");
    payload.extend_from_slice(rest);
    let (_, publish) = decode_bus_message(&payload)?;
    Some(Numbered { seq, publish })
}

/// Up to which `x-seq` the room's history was cleared, if this is that word rather than a
/// message.
pub fn cleared_of(publish: &Publish) -> Option<u64> {
    let (name, value) = publish.headers().next()?;
    (name == CLEARED_HEADER)
        .then(|| value.parse().ok())
        .flatten()
}

/// The `x-seq` a room message on the bus carries (its first header), if any: transient
/// messages have none.
pub fn seq_of(publish: &Publish) -> Option<u64> {
    publish
        .headers()
        .find(|(name, _)| *name == "x-seq")
        .and_then(|(_, v)| v.parse().ok())
}

/// Stream entries (`[[id, [field, value, ...]], ...]`) as numbered messages.
fn entries(value: &Value) -> Vec<Numbered> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(pair) = item else { continue };
        let [id, Value::Array(fields)] = &pair[..] else {
            continue;
        };
        let seq = match id {
            Value::BulkString(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.split('-').next())
                .and_then(|s| s.parse().ok()),
            _ => None,
        };
        let body = fields.chunks(2).find_map(|kv| match kv {
            [Value::BulkString(k), Value::BulkString(v)] if k == b"m" => Some(v),
            _ => None,
        });
        match (seq, body) {
            (Some(seq), Some(rest)) => match number(seq, rest) {
                Some(n) => out.push(n),
                None => warn!(seq, "a room log entry that is not a STOMP frame: skipped"),
            },
            _ => warn!("a room log entry not written by Stoa: skipped"),
        }
    }
    out
}

impl RoomBus {
    /// The rooms' side of `cluster`, keeping history within `limits`.
    pub fn new(cluster: Arc<Cluster>, limits: RoomLimits) -> RoomBus {
        let (writes, writes_rx) = mpsc::unbounded_channel();
        RoomBus {
            cluster,
            limits,
            script: redis::Script::new(ROOM_SCRIPT),
            writes,
            writes_rx: std::sync::Mutex::new(Some(writes_rx)),
        }
    }

    /// The cluster this is part of.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    fn key(&self, room: &str, part: &str) -> String {
        format!("{}room:{room}{part}", self.cluster.settings.prefix)
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.cluster.settings.timeout
    }

    /// Numbers, keeps and publishes `rest` (see [`log_entry`]) in `room`; `answer` gets
    /// its `x-seq`, or fails if Redis did not take it within `--cluster-timeout-ms`.
    pub fn append(&self, room: Arc<str>, rest: Bytes, answer: Answer) {
        let write = Write {
            room,
            rest,
            op: Op::Append { answer },
            deadline: self.deadline(),
        };
        // Refused only once the writes stopped: the answer, dropped, fails.
        let _ = self.writes.send(write);
    }

    /// Notes subscription `field` of `user` in `room`, with `notice` posted if it is the
    /// user's first anywhere; `answer` says when it is noted.
    pub fn join(&self, room: Arc<str>, field: String, user: &str, notice: Bytes, answer: Answer) {
        let _ = self.writes.send(Write {
            room,
            rest: notice,
            op: Op::Join {
                field,
                user: user.to_owned(),
                answer,
            },
            deadline: self.deadline(),
        });
    }

    /// Takes back subscription `field` of `user` in `room`, with `notice` posted if it was
    /// the user's last anywhere. Retried until Redis takes it.
    pub fn leave(&self, room: Arc<str>, field: String, user: &str, notice: Bytes) {
        let _ = self.writes.send(Write {
            room,
            rest: notice,
            op: Op::Leave {
                field,
                user: user.to_owned(),
            },
            deadline: self.deadline(),
        });
    }

    /// The presence field of subscription `key` of `session` in `room`.
    pub fn field(room: &str, session: u64, key: u32) -> String {
        format!("{room}\n{session}\n{key}")
    }

    /// Listens to `room`'s channel; the answer comes once Redis confirmed it.
    pub fn listen(&self, room: &str, on: bool) -> oneshot::Receiver<()> {
        let channel = super::topic_channel(&self.cluster.settings.prefix, &format!("room.{room}"));
        self.cluster.listen_channel(channel, on)
    }

    /// The room's newest `x-seq`, members and newest kept messages, read in one step.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn sync(&self, room: &str) -> redis::RedisResult<Synced> {
        let mut redis = self.cluster.redis.clone();
        let count = self.limits.messages.max(1);
        let (seq, members, history): (Option<u64>, Vec<String>, Value) = redis::pipe()
            .atomic()
            .hget(self.key(room, ""), "seq")
            .hkeys(self.key(room, ":members"))
            .cmd("XREVRANGE")
            .arg(self.key(room, ":log"))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut redis)
            .await?;
        let mut history = entries(&history);
        history.reverse();
        if self.limits.messages == 0 {
            history.clear();
        }
        Ok(Synced {
            seq: seq.unwrap_or(0),
            members,
            history,
        })
    }

    /// Kept messages of `room` after `after`, at most `limit`, oldest first.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn range(
        &self,
        room: &str,
        after: u64,
        limit: usize,
    ) -> redis::RedisResult<Vec<Numbered>> {
        let mut redis = self.cluster.redis.clone();
        let value: Value = redis::cmd("XRANGE")
            .arg(self.key(room, ":log"))
            .arg(format!("{}-0", after.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut redis)
            .await?;
        Ok(entries(&value))
    }

    /// Deletes the messages `room` keeps (`/admin`), and tells every node's copy to drop
    /// them too, in order with the room's messages: how many went, or `None` for a room
    /// Redis does not know.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn clear(&self, room: &str) -> redis::RedisResult<Option<usize>> {
        let prefix = &self.cluster.settings.prefix;
        let mut redis = self.cluster.redis.clone();
        let cleared: i64 = self
            .script
            .key(self.key(room, ""))
            .key(self.key(room, ":log"))
            .arg("clear")
            .arg(room)
            // The rest of the word's frame: decodable as a message, delivered to no one.
            .arg(&b"message-id:0\n\n\0"[..])
            .arg(0)
            .arg(0)
            .arg(format!("{prefix}topic:room.{room}"))
            .arg(self.cluster.node())
            .invoke_async(&mut redis)
            .await?;
        Ok(usize::try_from(cleared).ok())
    }

    /// Every room with members or messages, cluster-wide, by name.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn rooms(&self) -> redis::RedisResult<Vec<RoomState>> {
        let mut redis = self.cluster.redis.clone();
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}rooms", self.cluster.settings.prefix))
            .query_async(&mut redis)
            .await?;
        names.sort();
        let mut list = Vec::with_capacity(names.len());
        for chunk in names.chunks(256) {
            let mut pipe = redis::pipe();
            for name in chunk {
                pipe.hget(self.key(name, ""), "seq")
                    .hkeys(self.key(name, ":members"));
            }
            let answers: Vec<Value> = pipe.query_async(&mut redis).await?;
            for (name, pair) in chunk.iter().zip(answers.chunks(2)) {
                let [seq, members] = pair else { continue };
                let last_seq = redis::from_redis_value_ref::<Option<u64>>(seq)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                let mut members: Vec<String> =
                    redis::from_redis_value_ref(members).unwrap_or_default();
                members.sort();
                if last_seq > 0 || !members.is_empty() {
                    list.push(RoomState {
                        room: name.clone(),
                        members,
                        last_seq,
                    });
                }
            }
        }
        Ok(list)
    }

    /// One room, cluster-wide; `None` for a room never used.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn room(&self, room: &str) -> redis::RedisResult<Option<RoomState>> {
        let mut redis = self.cluster.redis.clone();
        let (seq, mut members): (Option<u64>, Vec<String>) = redis::pipe()
            .hget(self.key(room, ""), "seq")
            .hkeys(self.key(room, ":members"))
            .query_async(&mut redis)
            .await?;
        members.sort();
        Ok((seq.is_some() || !members.is_empty()).then(|| RoomState {
            room: room.to_owned(),
            members,
            last_seq: seq.unwrap_or(0),
        }))
    }

    /// Posts the leave notices of a node's sessions that are gone (the node died, or this
    /// node's previous life): `force` when the node is surely gone (this node, starting),
    /// otherwise only while its heartbeat has expired. `notice` makes the leave notice of
    /// a user in a room. Each is posted once, however many nodes do this at once.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn reap(
        &self,
        node: &str,
        force: bool,
        notice: impl Fn(&str, &str) -> Bytes,
    ) -> redis::RedisResult<usize> {
        let prefix = &self.cluster.settings.prefix;
        let presence = format!("{prefix}presence:{node}");
        let heartbeat = format!("{prefix}node:{node}");
        let mut redis = self.cluster.redis.clone();
        let entries: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(&presence)
            .query_async(&mut redis)
            .await?;
        let mut posted = 0;
        for (field, user) in entries {
            let Some((room, _)) = field.split_once('\n') else {
                continue;
            };
            let seq: u64 = self
                .script
                .key(self.key(room, ""))
                .key(self.key(room, ":log"))
                .key(format!("{prefix}rooms"))
                .key(self.key(room, ":members"))
                .key(&presence)
                .key(&heartbeat)
                .arg("reap")
                .arg(room)
                .arg(notice(room, &user).as_ref())
                .arg(self.limits.messages)
                .arg(self.limits.bytes)
                .arg(format!("{prefix}topic:room.{room}"))
                .arg(self.cluster.node())
                .arg(&field)
                .arg(&user)
                .arg(if force { "force" } else { "-" })
                .invoke_async(&mut redis)
                .await?;
            posted += usize::from(seq > 0);
        }
        Ok(posted)
    }

    /// Runs the writes until `stop`.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let Some(queued) = self.writes_rx.lock().ok().and_then(|mut w| w.take()) else {
            return;
        };
        let timeout = self.cluster.settings.timeout;
        super::run_writes(queued, stop, timeout, |mut batch: Vec<Write>| {
            let me = self.clone();
            async move {
                let answered = me.send(&mut batch).await;
                (batch, answered)
            }
        })
        .await;
    }

    /// Sends a batch in one pipeline. Answers what was answered; keeps in `batch` what
    /// must be tried again; whether Redis answered.
    async fn send(&self, batch: &mut Vec<Write>) -> bool {
        let prefix = &self.cluster.settings.prefix;
        let member = format!("{prefix}member:{}", self.cluster.node());
        let presence = format!("{prefix}presence:{}", self.cluster.node());
        let rooms = format!("{prefix}rooms");
        let incarnation = self.cluster.incarnation().to_string();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("SCRIPT").arg("LOAD").arg(ROOM_SCRIPT);
        for write in batch.iter() {
            let (op, field, user) = match &write.op {
                Op::Append { .. } => ("append", "", ""),
                Op::Join { field, user, .. } => ("join", field.as_str(), user.as_str()),
                Op::Leave { field, user } => ("leave", field.as_str(), user.as_str()),
            };
            let room = &*write.room;
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(6)
                .arg(self.key(room, ""))
                .arg(self.key(room, ":log"))
                .arg(&rooms)
                .arg(self.key(room, ":members"))
                .arg(&presence)
                .arg(&member)
                .arg(op)
                .arg(room)
                .arg(write.rest.as_ref())
                .arg(self.limits.messages)
                .arg(self.limits.bytes)
                .arg(format!("{prefix}topic:room.{room}"))
                .arg(self.cluster.node())
                .arg(field)
                .arg(user)
                .arg(&incarnation);
        }
        let mut redis = self.cluster.redis.clone();
        let answers: Vec<redis::RedisResult<Value>> = match pipe.query_async(&mut redis).await {
            Ok(answers) => answers,
            Err(e) => {
                let sent = !e.is_connection_refusal();
                debug!("room writes: Redis did not answer: {e}");
                let now = Instant::now();
                let pending = std::mem::take(batch);
                for write in pending {
                    match write.op {
                        // Retried only while surely not applied, and not past its time.
                        Op::Append { answer } if sent || now >= write.deadline => {
                            warn!(room = %write.room, "a room message was not kept: {e}");
                            answer.complete(Err(End::ClusterUnavailable));
                        }
                        Op::Join { answer, .. } if now >= write.deadline => {
                            answer.complete(Err(End::ClusterUnavailable));
                        }
                        op => batch.push(Write { op, ..write }),
                    }
                }
                return false;
            }
        };
        let mut answers = answers.into_iter().skip(1);
        for write in batch.drain(..) {
            let answer = answers.next().unwrap_or_else(|| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "no answer",
                )))
            });
            let seq = answer.as_ref().ok().and_then(|v| match v {
                Value::Int(n) => u64::try_from(*n).ok(),
                _ => None,
            });
            if let Err(e) = &answer {
                warn!(room = %write.room, "Redis refused a room write: {e}");
            }
            match write.op {
                Op::Append { answer } => answer.complete(
                    seq.filter(|s| *s > 0)
                        .map(Some)
                        .ok_or(End::ClusterUnavailable),
                ),
                Op::Join { answer, .. } => answer.complete(if seq.is_some() {
                    Ok(None)
                } else {
                    Err(End::ClusterUnavailable)
                }),
                Op::Leave { .. } => {}
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use stomp_codec::Headers;

    use super::*;

    #[test]
    fn a_log_entry_numbered_is_the_message_with_its_seq_first() {
        let mut headers = Headers::new();
        headers.push("destination", "/topic/room.lobby");
        headers.push("message-id", "77");
        headers.push("x-sender", "a:b\nc");
        let publish = Publish::new(77, headers, Bytes::from_static(b"hi\0there"));
        let rest = log_entry(&publish);
        let numbered = number(12, &rest).unwrap();
        assert_eq!(numbered.seq, 12);
        assert_eq!(seq_of(&numbered.publish), Some(12));
        let headers: Vec<(String, String)> = numbered
            .publish
            .headers()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(headers[0], ("x-seq".to_owned(), "12".to_owned()));
        assert!(headers.contains(&("x-sender".to_owned(), "a:b\nc".to_owned())));
        assert_eq!(numbered.publish.body().as_ref(), b"hi\0there");
        assert_eq!(numbered.publish.message_id, 77);
    }
}
