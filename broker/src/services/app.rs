//! `/app/...`: server replies, in the style of Spring's `@SubscribeMapping`. A SUBSCRIBE
//! gets one MESSAGE with a JSON answer; nothing else follows on it.
//!
//! In: SUBSCRIBE to `/app/rooms` or `/app/room.<room>.members`. Out: one MESSAGE with
//! `content-type:application/json` for that subscription.

use std::sync::Arc;

use bytes::Bytes;
use stomp_codec::Headers;

use crate::router::{
    MessageIds, Publish, PublishRequest, Published, Service, SubscribeRequest, Subscriber,
};
use crate::services::{RoomDetail, Rooms, check_room_name};
use crate::session::SessionError;

/// The `/app` replies.
#[derive(Debug)]
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

impl App {
    /// Replies drawn from `rooms`.
    pub fn new(rooms: Arc<Rooms>, ids: Arc<MessageIds>) -> App {
        App { rooms, ids }
    }

    /// `{"rooms":[{"room":"lobby","members":3,"last_seq":42}]}`.
    pub fn rooms_json(&self) -> String {
        serde_json::json!({ "rooms": self.rooms.summaries() }).to_string()
    }

    /// `{"room":"lobby","members":["alice","bob"],"last_seq":42}`; a room that never
    /// existed has no members and `last_seq` 0.
    pub fn members_json(&self, room: &str) -> String {
        let detail = self.rooms.detail(room).unwrap_or_else(|| RoomDetail {
            room: room.to_owned(),
            members: Vec::new(),
            last_seq: 0,
        });
        serde_json::to_value(&detail)
            .map(|v| v.to_string())
            .unwrap_or_default()
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
}

impl Service for App {
    fn check_send(&self, key: &str) -> Result<(), SessionError> {
        Err(SessionError::NoApplicationHandler(format!("/app/{key}")))
    }

    fn subscribe(&self, request: SubscribeRequest<'_>) -> Result<(), SessionError> {
        let json = match question(request.key) {
            Some(Question::Rooms) => self.rooms_json(),
            Some(Question::Members(room)) => {
                check_room_name(room)?;
                self.members_json(room)
            }
            None => {
                return Err(SessionError::NoApplicationHandler(
                    request.destination.to_owned(),
                ));
            }
        };
        self.answer(request.destination, json, &request.subscriber);
        Ok(())
    }

    fn unsubscribe(&self, _key: &str, _subscriber: &Subscriber) {}

    fn publish(&self, request: PublishRequest<'_>) -> Result<Published, SessionError> {
        Err(SessionError::NoApplicationHandler(
            request.destination.to_owned(),
        ))
    }
}
