//! Durable queues shared through Redis (`--cluster`): `/queue/<name>`.
//!
//! In: SENDs to a queue, this node's consumers asking for messages (as many as their
//! `prefetch-count` leaves room for), their ACKs and NACKs, consumers leaving. Out: each
//! message leased to one consumer in the cluster (a script pops it from the queue's ready
//! list and records the lease, so two consumers never get one message); ACKed messages
//! gone, NACKed and orphaned ones back at the front, marked to go out `redelivered:true`.
//! A put, an ACK or a release PUBLISHes a wake-up on the queue's channel, which the nodes
//! with consumers of the queue listen to.
//!
//! Keys, under the cluster prefix `P`, for queue `q`: `P q:<q>:ready` (list of message ids,
//! oldest first), `P q:<q>:msgs` (hash: id → `<body bytes>\n<frame>`), `P q:<q>:unacked`
//! (hash: id → the lease's owner, `<node>\n<incarnation>\n<session>\n<subscription>`),
//! `P q:<q>:redelivered` (set of ids), `P q:<q>:bytes` (body bytes held); `P queues` (set of
//! names), `P qconsumers` (hash: queue → consumers anywhere); per node `P qleases:<node>`
//! (hash: `<q>\n<id>` → 1) and `P qsubs:<node>` (hash: `<q>\n<session>\n<subscription>` → 1),
//! so that a dead node's leases and consumers can be found. Channel: `P queue:<q>`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use redis::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use super::{Cluster, decode_bus_message};
use crate::message::Publish;

/// The one script for every queue write, dispatched on `ARGV[1]`. KEYS: 1 ready, 2 msgs,
/// 3 unacked, 4 redelivered, 5 bytes, 6 the set of queues, 7 this node's leases, 8 the
/// consumer counts, 9 this node's consumers; for a take, 10 this node's member key.
const QUEUE_SCRIPT: &str = r"
local op = ARGV[1]
if op == 'put' then
  -- ARGV: op, queue, id, frame, body bytes, most messages, most bytes, channel
  if redis.call('LLEN', KEYS[1]) + redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[6])
     or tonumber(redis.call('GET', KEYS[5]) or '0') + tonumber(ARGV[5]) > tonumber(ARGV[7]) then
    return redis.error_reply('FULL the queue is full')
  end
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[5] .. '\n' .. ARGV[4])
  redis.call('RPUSH', KEYS[1], ARGV[3])
  redis.call('INCRBY', KEYS[5], ARGV[5])
  redis.call('SADD', KEYS[6], ARGV[2])
  redis.call('PUBLISH', ARGV[8], '')
  return 1
end
if op == 'take' then
  -- ARGV: op, queue, owner, most to take, incarnation. KEYS[10]: this node's member key.
  if redis.call('GET', KEYS[10]) ~= ARGV[5] then
    return redis.error_reply('FENCED this node is no longer a member of the cluster')
  end
  local out = {}
  for i = 1, tonumber(ARGV[4]) do
    local id = redis.call('LPOP', KEYS[1])
    if not id then break end
    local v = redis.call('HGET', KEYS[2], id)
    if v then
      redis.call('HSET', KEYS[3], id, ARGV[3])
      redis.call('HSET', KEYS[7], ARGV[2] .. '\n' .. id, 1)
      table.insert(out, id)
      table.insert(out, redis.call('SISMEMBER', KEYS[4], id))
      table.insert(out, v)
    end
  end
  return out
end
if op == 'ack' or op == 'release' then
  -- ARGV: op, queue, owner, channel, ids (release: oldest first)
  local first, last, step = 5, #ARGV, 1
  if op == 'release' then first, last, step = #ARGV, 5, -1 end
  for i = first, last, step do
    local id = ARGV[i]
    if redis.call('HGET', KEYS[3], id) == ARGV[3] then
      redis.call('HDEL', KEYS[3], id)
      if op == 'ack' then
        local v = redis.call('HGET', KEYS[2], id)
        if v then redis.call('DECRBY', KEYS[5], tonumber(string.match(v, '^%d+'))) end
        redis.call('HDEL', KEYS[2], id)
        redis.call('SREM', KEYS[4], id)
      else
        redis.call('SADD', KEYS[4], id)
        redis.call('LPUSH', KEYS[1], id)
      end
    end
    redis.call('HDEL', KEYS[7], ARGV[2] .. '\n' .. id)
  end
  if op == 'release' then redis.call('PUBLISH', ARGV[4], '') end
  return 0
end
if op == 'purge' then
  -- ARGV: op, queue. The waiting messages go (not the leased ones); -1 for no such queue.
  if redis.call('SISMEMBER', KEYS[6], ARGV[2]) == 0 then return -1 end
  local ids = redis.call('LRANGE', KEYS[1], 0, -1)
  for _, id in ipairs(ids) do
    local v = redis.call('HGET', KEYS[2], id)
    if v then redis.call('DECRBY', KEYS[5], tonumber(string.match(v, '^%d+'))) end
    redis.call('HDEL', KEYS[2], id)
    redis.call('SREM', KEYS[4], id)
  end
  redis.call('DEL', KEYS[1])
  return #ids
end
if op == 'join' then
  -- ARGV: op, queue, field
  if redis.call('HSETNX', KEYS[9], ARGV[3], 1) == 1 then redis.call('HINCRBY', KEYS[8], ARGV[2], 1) end
  redis.call('SADD', KEYS[6], ARGV[2])
  return 0
end
if op == 'leave' then
  if redis.call('HDEL', KEYS[9], ARGV[3]) == 1 then
    if redis.call('HINCRBY', KEYS[8], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[8], ARGV[2]) end
  end
  return 0
end
return redis.error_reply('ERR unknown queue operation')
";

/// Hands a dead node's leases back (redelivered, oldest first at the front) and takes its
/// consumers out of the counts. KEYS: 1 its leases, 2 its consumers, 3 the consumer
/// counts, 4 its heartbeat. ARGV: prefix, `<node>\n` (the owners to look for), force.
/// The queues' keys are derived from the prefix (one Redis, not Redis Cluster).
const REAP_SCRIPT: &str = r"
if ARGV[3] ~= 'force' and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local p, owner = ARGV[1], ARGV[2]
local byqueue = {}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  local q, id = string.match(field, '^(.*)\n([^\n]*)$')
  if q then
    byqueue[q] = byqueue[q] or {}
    table.insert(byqueue[q], id)
  end
end
-- Ids are decimal strings past 2^53: ordered as strings of digits, not as Lua numbers.
local function older(x, y)
  if #x ~= #y then return #x < #y end
  return x < y
end
local moved = 0
for q, ids in pairs(byqueue) do
  table.sort(ids, older)
  for i = #ids, 1, -1 do
    local id = ids[i]
    local held = redis.call('HGET', p .. 'q:' .. q .. ':unacked', id)
    if held and string.sub(held, 1, string.len(owner)) == owner then
      redis.call('HDEL', p .. 'q:' .. q .. ':unacked', id)
      redis.call('SADD', p .. 'q:' .. q .. ':redelivered', id)
      redis.call('LPUSH', p .. 'q:' .. q .. ':ready', id)
      moved = moved + 1
    end
  end
  redis.call('PUBLISH', p .. 'queue:' .. q, '')
end
redis.call('DEL', KEYS[1])
for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
  local q = string.match(field, '^[^\n]*')
  if redis.call('HINCRBY', KEYS[3], q, -1) <= 0 then redis.call('HDEL', KEYS[3], q) end
end
redis.call('DEL', KEYS[2])
return moved
";

/// How a put went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Kept (and, with `appendfsync always`, on disk).
    Kept,
    /// The queue holds `--queue-max-messages` or `--queue-max-bytes` already.
    Full,
}

/// A message leased to a consumer.
#[derive(Debug)]
pub struct Leased {
    /// Its id (its `message-id`).
    pub id: u64,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// The message.
    pub publish: Publish,
}

/// One queue's figures, cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedQueueStats {
    /// The queue's name.
    pub queue: String,
    /// Messages waiting for a consumer.
    pub ready: usize,
    /// Messages leased and not yet acknowledged.
    pub unacked: usize,
    /// Consumers anywhere.
    pub consumers: usize,
}

/// What to do with a put's outcome.
pub type PutDone = Box<dyn FnOnce(Result<Put, ()>) + Send>;

enum Op {
    Put {
        id: u64,
        frame: Bytes,
        body: usize,
        done: PutDone,
    },
    Settle {
        ack: bool,
        owner: String,
        ids: Vec<u64>,
    },
    Consumer {
        join: bool,
        field: String,
    },
}

struct Write {
    queue: String,
    op: Op,
    deadline: Instant,
}

/// Merges ACKs that follow each other for one queue and owner into one (an `ack:auto`
/// consumer settles each message as it is written: one script call per batch rather than
/// per message). Only neighbours merge, and never hand-backs, whose order is the queue's.
fn coalesce(batch: &mut Vec<Write>) {
    let mut merged: Vec<Write> = Vec::with_capacity(batch.len());
    for write in batch.drain(..) {
        if let (
            Some(Write {
                queue,
                op:
                    Op::Settle {
                        ack: last_ack,
                        owner: last_owner,
                        ids: last_ids,
                    },
                ..
            }),
            Op::Settle { ack, owner, ids },
        ) = (merged.last_mut(), &write.op)
            && *queue == write.queue
            && *last_ack
            && *ack
            && last_owner == owner
            && last_ids.len() < 1024
        {
            last_ids.extend_from_slice(ids);
            continue;
        }
        merged.push(write);
    }
    *batch = merged;
}

/// The durable queues' side of the cluster.
pub struct QueueBus {
    cluster: Arc<Cluster>,
    script: redis::Script,
    reap: redis::Script,
    /// Most messages and body bytes per queue.
    limits: (usize, usize),
    writes: mpsc::UnboundedSender<Write>,
    writes_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Write>>>,
}

impl std::fmt::Debug for QueueBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBus").finish_non_exhaustive()
    }
}

impl QueueBus {
    /// The queues' side of `cluster`, at most `limits` (messages, body bytes) per queue.
    pub fn new(cluster: Arc<Cluster>, limits: (usize, usize)) -> QueueBus {
        let (writes, writes_rx) = mpsc::unbounded_channel();
        QueueBus {
            cluster,
            script: redis::Script::new(QUEUE_SCRIPT),
            reap: redis::Script::new(REAP_SCRIPT),
            limits,
            writes,
            writes_rx: std::sync::Mutex::new(Some(writes_rx)),
        }
    }

    /// The cluster this is part of.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    fn prefix(&self) -> &str {
        &self.cluster.settings.prefix
    }

    /// The nine keys of [`QUEUE_SCRIPT`] for `queue`.
    fn keys(&self, queue: &str) -> [String; 9] {
        let (p, node) = (self.prefix(), self.cluster.node());
        [
            format!("{p}q:{queue}:ready"),
            format!("{p}q:{queue}:msgs"),
            format!("{p}q:{queue}:unacked"),
            format!("{p}q:{queue}:redelivered"),
            format!("{p}q:{queue}:bytes"),
            format!("{p}queues"),
            format!("{p}qleases:{node}"),
            format!("{p}qconsumers"),
            format!("{p}qsubs:{node}"),
        ]
    }

    fn channel(&self, queue: &str) -> String {
        format!("{}queue:{queue}", self.prefix())
    }

    /// The owner of the leases of subscription `key` of `session` on this node.
    pub fn owner(&self, session: u64, key: u32) -> String {
        format!(
            "{}\n{}\n{session}\n{key}",
            self.cluster.node(),
            self.cluster.incarnation()
        )
    }

    /// The consumer field of subscription `key` of `session` to `queue`.
    pub fn field(queue: &str, session: u64, key: u32) -> String {
        format!("{queue}\n{session}\n{key}")
    }

    fn push(&self, queue: &str, op: Op) {
        let _ = self.writes.send(Write {
            queue: queue.to_owned(),
            op,
            deadline: Instant::now() + self.cluster.settings.timeout,
        });
    }

    /// Keeps `publish` at the back of `queue`; `done` gets the outcome (`Err` when Redis did
    /// not take it within `--cluster-timeout-ms`).
    pub fn put(&self, queue: &str, publish: &Publish, done: PutDone) {
        self.push(
            queue,
            Op::Put {
                id: publish.message_id,
                frame: super::rooms::log_entry(publish),
                body: publish.body().len(),
                done,
            },
        );
    }

    /// ACKs (`ack`) or hands back (NACK, a consumer gone: redelivered, at the front)
    /// messages leased to `owner`. Retried until Redis takes it.
    pub fn settle(&self, queue: &str, owner: String, ids: Vec<u64>, ack: bool) {
        if !ids.is_empty() {
            self.push(queue, Op::Settle { ack, owner, ids });
        }
    }

    /// Counts a consumer in (`join`) or out, cluster-wide.
    pub fn consumer(&self, queue: &str, field: String, join: bool) {
        self.push(queue, Op::Consumer { join, field });
    }

    /// Listens to `queue`'s wake-ups; the answer comes once Redis confirmed it.
    pub fn listen(&self, queue: &str, on: bool) -> oneshot::Receiver<()> {
        self.cluster.listen_channel(self.channel(queue), on)
    }

    /// Leases up to `most` ready messages of `queue` to `owner`, oldest first.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn take(
        &self,
        queue: &str,
        owner: &str,
        most: usize,
    ) -> redis::RedisResult<Vec<Leased>> {
        let mut redis = self.cluster.redis.clone();
        let mut invocation = self.script.prepare_invoke();
        for key in self.keys(queue) {
            invocation.key(key);
        }
        // A node declared dead takes nothing more: what it held went to others.
        invocation.key(format!("{}member:{}", self.prefix(), self.cluster.node()));
        let answer: Vec<Value> = invocation
            .arg("take")
            .arg(queue)
            .arg(owner)
            .arg(most)
            .arg(self.cluster.incarnation())
            .invoke_async(&mut redis)
            .await?;
        let mut leased = Vec::new();
        for triple in answer.chunks(3) {
            let [
                Value::BulkString(id),
                Value::Int(again),
                Value::BulkString(stored),
            ] = triple
            else {
                continue;
            };
            let id = std::str::from_utf8(id).ok().and_then(|s| s.parse().ok());
            let frame = stored
                .iter()
                .position(|&b| b == b'\n')
                .map(|at| &stored[at + 1..]);
            let publish = frame.and_then(|frame| {
                let mut payload = Vec::with_capacity(frame.len() + 9);
                payload.extend_from_slice(b"\nMESSAGE\n");
                payload.extend_from_slice(frame);
                decode_bus_message(&payload).map(|(_, p)| p)
            });
            match (id, publish) {
                (Some(id), Some(publish)) => leased.push(Leased {
                    id,
                    redelivered: *again == 1,
                    publish,
                }),
                _ => warn!(%queue, "a queued message that is not Stoa's: skipped"),
            }
        }
        Ok(leased)
    }

    /// Deletes the messages waiting in `queue`, cluster-wide (those leased stay): how many,
    /// or `None` for a queue Redis does not know.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn purge(&self, queue: &str) -> redis::RedisResult<Option<usize>> {
        let mut redis = self.cluster.redis.clone();
        let mut invocation = self.script.prepare_invoke();
        for key in self.keys(queue) {
            invocation.key(key);
        }
        let purged: i64 = invocation
            .arg("purge")
            .arg(queue)
            .invoke_async(&mut redis)
            .await?;
        Ok(usize::try_from(purged).ok())
    }

    /// Every queue's figures, cluster-wide, by name.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn stats(&self) -> redis::RedisResult<Vec<SharedQueueStats>> {
        let mut redis = self.cluster.redis.clone();
        let p = self.prefix();
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{p}queues"))
            .query_async(&mut redis)
            .await?;
        names.sort();
        let mut list = Vec::with_capacity(names.len());
        for chunk in names.chunks(256) {
            let mut pipe = redis::pipe();
            for name in chunk {
                pipe.llen(format!("{p}q:{name}:ready"))
                    .hlen(format!("{p}q:{name}:unacked"))
                    .hget(format!("{p}qconsumers"), name);
            }
            let answers: Vec<Value> = pipe.query_async(&mut redis).await?;
            for (name, triple) in chunk.iter().zip(answers.chunks(3)) {
                let number = |v: &Value| -> usize {
                    redis::from_redis_value_ref::<Option<usize>>(v)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                };
                if let [ready, unacked, consumers] = triple {
                    list.push(SharedQueueStats {
                        queue: name.clone(),
                        ready: number(ready),
                        unacked: number(unacked),
                        consumers: number(consumers),
                    });
                }
            }
        }
        Ok(list)
    }

    /// Hands a dead node's leases back and takes its consumers out (or this node's
    /// previous life's, `force`); how many messages went back.
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn reap(&self, node: &str, force: bool) -> redis::RedisResult<usize> {
        let p = self.prefix();
        let mut redis = self.cluster.redis.clone();
        self.reap
            .key(format!("{p}qleases:{node}"))
            .key(format!("{p}qsubs:{node}"))
            .key(format!("{p}qconsumers"))
            .key(format!("{p}node:{node}"))
            .arg(p)
            .arg(format!("{node}\n"))
            .arg(if force { "force" } else { "-" })
            .invoke_async(&mut redis)
            .await
    }

    /// Runs the writes until `stop`: puts in order, settles and consumer counts retried
    /// until Redis takes them (they are idempotent), puts only while surely not applied.
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

    /// One pipeline; keeps in `batch` what must be tried again; whether Redis answered.
    async fn send(&self, batch: &mut Vec<Write>) -> bool {
        coalesce(batch);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("SCRIPT").arg("LOAD").arg(QUEUE_SCRIPT);
        for write in batch.iter() {
            let queue = write.queue.as_str();
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.script.get_hash()).arg(9);
            for key in self.keys(queue) {
                cmd.arg(key);
            }
            match &write.op {
                Op::Put {
                    id, frame, body, ..
                } => {
                    cmd.arg("put")
                        .arg(queue)
                        .arg(*id)
                        .arg(frame.as_ref())
                        .arg(*body)
                        .arg(self.limits.0)
                        .arg(self.limits.1)
                        .arg(self.channel(queue));
                }
                Op::Settle { ack, owner, ids } => {
                    cmd.arg(if *ack { "ack" } else { "release" })
                        .arg(queue)
                        .arg(owner)
                        .arg(self.channel(queue));
                    for id in ids {
                        cmd.arg(*id);
                    }
                }
                Op::Consumer { join, field } => {
                    cmd.arg(if *join { "join" } else { "leave" })
                        .arg(queue)
                        .arg(field);
                }
            }
            pipe.add_command(cmd);
        }
        let mut redis = self.cluster.redis.clone();
        let answers: Vec<redis::RedisResult<Value>> = match pipe.query_async(&mut redis).await {
            Ok(answers) => answers,
            Err(e) => {
                let refused = e.is_connection_refusal();
                let now = Instant::now();
                for write in std::mem::take(batch) {
                    match write.op {
                        Op::Put { done, .. } if !refused || now >= write.deadline => {
                            warn!(queue = %write.queue, "a queue message was not kept: {e}");
                            done(Err(()));
                        }
                        op => batch.push(Write { op, ..write }),
                    }
                }
                return false;
            }
        };
        let mut answers = answers.into_iter().skip(1);
        for write in batch.drain(..) {
            let answer = answers.next();
            if let Op::Put { done, .. } = write.op {
                done(match answer {
                    Some(Ok(_)) => Ok(Put::Kept),
                    Some(Err(e)) if e.code() == Some("FULL") => Ok(Put::Full),
                    other => {
                        warn!(queue = %write.queue, "Redis refused a queue message: {other:?}");
                        Err(())
                    }
                });
            } else if let Some(Err(e)) = answer {
                warn!(queue = %write.queue, "Redis refused a queue change: {e}");
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(ack: bool, owner: &str, ids: &[u64]) -> Write {
        Write {
            queue: "jobs".to_owned(),
            op: Op::Settle {
                ack,
                owner: owner.to_owned(),
                ids: ids.to_vec(),
            },
            deadline: Instant::now(),
        }
    }

    fn shape(batch: &[Write]) -> Vec<(bool, String, Vec<u64>)> {
        batch
            .iter()
            .filter_map(|w| match &w.op {
                Op::Settle { ack, owner, ids } => Some((*ack, owner.clone(), ids.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn neighbouring_acks_of_one_owner_merge_and_hand_backs_keep_their_order() {
        let mut batch = vec![
            settle(true, "a", &[1]),
            settle(true, "a", &[2, 3]),
            settle(true, "b", &[4]),
            settle(false, "b", &[5, 7]),
            settle(false, "b", &[6]),
            settle(true, "b", &[8]),
        ];
        coalesce(&mut batch);
        assert_eq!(
            shape(&batch),
            [
                (true, "a".to_owned(), vec![1, 2, 3]),
                (true, "b".to_owned(), vec![4]),
                (false, "b".to_owned(), vec![5, 7]),
                (false, "b".to_owned(), vec![6]),
                (true, "b".to_owned(), vec![8]),
            ]
        );
    }
}
