//! `/app/...`: server replies, in the style of Spring's `@SubscribeMapping`. A SUBSCRIBE
//! gets one MESSAGE with a JSON answer; nothing else follows on it.
//!
//! In: SUBSCRIBE to `/app/rooms` or `/app/room.<room>.members`. Out: one MESSAGE with
//! `content-type:application/json` for that subscription.

use std::sync::Arc;

use bytes::Bytes;
use stomp_codec::Headers;

use crate::acl::Viewer;
use crate::error::SessionError;
use crate::message::{MessageIds, Publish};
use crate::service::{PublishRequest, Published, Service, SubscribeRequest, Subscriber};

use crate::outbox::End;
use crate::receipts::{Pending, Unavailable, pending};
use crate::services::{RoomDetail, RoomSummary, Rooms, check_room_name};

/// The `/app` replies.
#[derive(Debug, Clone)]
pub struct App {
    rooms: Arc<Rooms>,
    ids: Arc<MessageIds>,
}

/// What `/app/<key>` answers.
enum Question<'a> {
    Rooms,
    Members(&'a str),
}

fn question(key: &str) -> Option<Question<'_>> {
    if key == "rooms" {
        return Some(Question::Rooms);
    }
    let room = key.strip_prefix("room.")?.strip_suffix(".members")?;
    Some(Question::Members(room))
}

/// Whether `viewer` (with `--acl`) may see `room`: nothing is learned of a room one may
/// not enter.
fn visible(viewer: Option<&Viewer>, room: &str) -> bool {
    viewer.is_none_or(|v| v.may_subscribe(&format!("/topic/room.{room}")))
}

/// `{"rooms":[...]}` of the rooms `viewer` may see.
fn rooms_body(mut rooms: Vec<RoomSummary>, viewer: Option<&Viewer>) -> String {
    rooms.retain(|r| visible(viewer, &r.room));
    serde_json::json!({ "rooms": rooms }).to_string()
}

/// `{"room":..,"members":[..],"last_seq":..}`; a room that never existed has no members
/// and `last_seq` 0.
fn members_body(room: &str, detail: Option<RoomDetail>) -> String {
    let detail = detail.unwrap_or_else(|| RoomDetail {
        room: room.to_owned(),
        members: Vec::new(),
        last_seq: 0,
    });
    serde_json::to_value(&detail)
        .map(|v| v.to_string())
        .unwrap_or_default()
}

impl App {
    /// Replies drawn from `rooms`.
    pub fn new(rooms: Arc<Rooms>, ids: Arc<MessageIds>) -> App {
        App { rooms, ids }
    }

    /// `{"rooms":[{"room":"lobby","members":3,"last_seq":42}]}`: with `--acl`, only the
    /// rooms `viewer` may subscribe to.
    pub fn rooms_json(&self, viewer: Option<&Viewer>) -> String {
        rooms_body(self.rooms.summaries(), viewer)
    }

    /// A room's members, unless it never existed or `viewer` may not subscribe to it (the
    /// same answer: nothing is learned of a room one may not enter).
    pub fn detail(&self, room: &str, viewer: Option<&Viewer>) -> Option<RoomDetail> {
        visible(viewer, room)
            .then(|| self.rooms.detail(room))
            .flatten()
    }

    /// [`App::rooms_json`], cluster-wide with `--cluster` (read from Redis).
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn rooms_answer(&self, viewer: Option<&Viewer>) -> Result<String, Unavailable> {
        Ok(rooms_body(self.room_list().await?, viewer))
    }

    /// Every room with members or kept messages, by name: this node's, or cluster-wide with
    /// `--cluster` (read from Redis).
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn room_list(&self) -> Result<Vec<RoomSummary>, Unavailable> {
        let Some(shared) = self.rooms.cluster_rooms().await else {
            return Ok(self.rooms.summaries());
        };
        Ok(shared
            .map_err(|e| {
                tracing::warn!("listing the rooms from Redis: {e}");
                Unavailable
            })?
            .into_iter()
            .map(|r| RoomSummary {
                room: r.room,
                members: r.members.len(),
                last_seq: r.last_seq,
            })
            .collect())
    }

    /// [`App::detail`], cluster-wide with `--cluster` (read from Redis).
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn detail_answer(
        &self,
        room: &str,
        viewer: Option<&Viewer>,
    ) -> Result<Option<RoomDetail>, Unavailable> {
        if !visible(viewer, room) {
            return Ok(None);
        }
        let Some(shared) = self.rooms.cluster_room(room).await else {
            return Ok(self.rooms.detail(room));
        };
        let state = shared.map_err(|e| {
            tracing::warn!("reading room {room:?} from Redis: {e}");
            Unavailable
        })?;
        Ok(state.map(|r| RoomDetail {
            room: r.room,
            members: r.members,
            last_seq: r.last_seq,
        }))
    }

    /// `{"room":"lobby","members":["alice","bob"],"last_seq":42}`; a room that never
    /// existed (or that `viewer` may not enter) has no members and `last_seq` 0.
    pub fn members_json(&self, room: &str, viewer: Option<&Viewer>) -> String {
        members_body(room, self.detail(room, viewer))
    }

    fn answer(&self, destination: &str, json: String, subscriber: &Subscriber) {
        let message_id = self.ids.next();
        let mut digits = itoa::Buffer::new();
        let mut headers = Headers::new();
        headers.push("destination", destination);
        headers.push("message-id", digits.format(message_id));
        headers.push("content-type", "application/json");
        subscriber.offer(&Publish::new(message_id, headers, Bytes::from(json)), false);
    }

    /// With `--cluster`: the answer to `room`'s members (or the room list, `None`) is read
    /// from Redis, then sent; the SUBSCRIBE's RECEIPT waits for it.
    fn answer_later(&self, room: Option<String>, request: SubscribeRequest<'_>) -> Pending {
        let (pending, answer) = pending();
        let app = self.clone();
        let subscriber = request.subscriber;
        let destination = request.destination.to_owned();
        tokio::spawn(async move {
            let viewer = subscriber.viewer.as_deref();
            let json = match &room {
                None => app.rooms_answer(viewer).await,
                Some(room) => app
                    .detail_answer(room, viewer)
                    .await
                    .map(|detail| members_body(room, detail)),
            };
            match json {
                Ok(json) => {
                    app.answer(&destination, json, &subscriber);
                    answer.complete(Ok(None));
                }
                Err(Unavailable) => answer.complete(Err(End::ClusterUnavailable)),
            }
        });
        pending
    }
}

impl Service for App {
    fn check_send(&self, key: &str) -> Result<(), SessionError> {
        Err(SessionError::NoApplicationHandler(format!("/app/{key}")))
    }

    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<Option<Pending>, SessionError> {
        let room = match question(request.key) {
            Some(Question::Rooms) => None,
            Some(Question::Members(room)) => {
                check_room_name(room)?;
                Some(room)
            }
            None => {
                return Err(SessionError::NoApplicationHandler(
                    request.destination.to_owned(),
                ));
            }
        };
        if self.rooms.bus().is_some() {
            let room = room.map(str::to_owned);
            return Ok(Some(self.answer_later(room, request)));
        }
        let viewer = request.subscriber.viewer.as_deref();
        let json = match room {
            None => self.rooms_json(viewer),
            Some(room) => self.members_json(room, viewer),
        };
        self.answer(request.destination, json, &request.subscriber);
        Ok(None)
    }

    fn unsubscribe(&self, _key: &str, _subscriber: &Subscriber) {}

    fn publish(&self, request: PublishRequest<'_>) -> Result<Published, SessionError> {
        Err(SessionError::NoApplicationHandler(
            request.destination.to_owned(),
        ))
    }
}
