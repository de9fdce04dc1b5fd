//! Rounds over a folder, one page per call, so the caller commits each page (messages and
//! cursor together) before the next request is made.
//!
//! - Delta (the cursor): the first request carries `$select` (and the optional received-time
//!   bound); later requests follow `@odata.nextLink` verbatim; the last page carries the
//!   `@odata.deltaLink` to store. An expired cursor (410, `syncStateNotFound`,
//!   `resyncRequired`) restarts the round once from the round's initial query: for a stored
//!   link that is the unfiltered query of a first poll. Never a received-time filter: Graph
//!   caps a filtered round at 5,000 messages and freezes the filter in the new token, so a
//!   filtered resync loses what falls past the cap or is moved in later with an older
//!   receivedDateTime. The caller's ledger absorbs what it had already recorded.
//! - Received-since (the fallback): a list filtered on `receivedDateTime ge watermark`, in
//!   ascending order, nextLinks followed verbatim; the caller's ledger dedupes.

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{Method, Url};
use serde_json::Value;

use super::error::GraphError;
use super::message::{Message, select_fields};
use super::{Call, MailboxClient};

/// Where a delta round starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeltaStart {
    /// A fresh round: everything in the folder, or what was received since the bound.
    Initial {
        received_since: Option<DateTime<Utc>>,
    },
    /// A stored link: the deltaLink of the last round, or the nextLink of a round that was
    /// interrupted after a committed page.
    Link(String),
}

/// A delta round over one folder.
#[derive(Clone, Debug)]
pub struct DeltaOptions {
    /// Well-known name or folder id.
    pub folder: String,
    pub start: DeltaStart,
    /// Items per page (`Prefer: odata.maxpagesize`).
    pub page_size: u32,
    /// Select `body` too (only when delivery needs it: bodies make pages heavy).
    pub include_body: bool,
    /// Select `categories` too (only when `spec.filter` reads them: changing `$select`
    /// costs a resync, so MailboxPolls without such a filter keep their tokens).
    pub include_categories: bool,
}

impl DeltaOptions {
    pub fn new(folder: impl Into<String>, start: DeltaStart) -> Self {
        Self {
            folder: folder.into(),
            start,
            page_size: 100,
            include_body: false,
            include_categories: false,
        }
    }

    /// What a delta token of this round freezes (Graph keeps the first request's query
    /// options in every token of the round): the folder, `$select` and the filter. A stored
    /// cursor whose fingerprint differs must not be followed: its pages would come back with
    /// the old selection.
    pub fn fingerprint(&self) -> String {
        let filter = match &self.start {
            DeltaStart::Initial {
                received_since: Some(since),
            } => format!("receivedDateTime ge {}", graph_date(*since)),
            _ => String::new(),
        };
        format!(
            "delta/v1 folder={} $select={} $filter={filter}",
            self.folder,
            select_fields(self.include_body, self.include_categories)
        )
    }
}

/// A received-time round over one folder (the fallback mode).
#[derive(Clone, Debug)]
pub struct ListOptions {
    pub folder: String,
    /// `receivedDateTime ge since` (`ge`, not `gt`: received times have one-second precision).
    pub since: Option<DateTime<Utc>>,
    /// `$top`, 1 to 1000.
    pub page_size: u32,
    pub include_body: bool,
}

/// What follows a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageLink {
    /// More pages: the link to the next one (store it to resume an interrupted round).
    Next(String),
    /// Delta round done: the cursor of the next round.
    Delta(String),
    /// List round done.
    End,
}

/// One page of a round.
#[derive(Debug)]
pub struct Page {
    /// Items in Graph's order; repeats within and across pages are kept (dedupe by `id`).
    pub messages: Vec<Message>,
    pub link: PageLink,
    /// Items skipped as unreadable (no id, not an object).
    pub skipped: usize,
    /// Whether the round restarted from a resync query: cursor links stored for it are void.
    pub resynced: bool,
    /// Graph's request-id of the page.
    pub request_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Delta,
    List,
}

/// A round in progress; see the module documentation.
#[derive(Debug)]
pub struct Round {
    client: MailboxClient,
    mode: Mode,
    folder: String,
    page_size: u32,
    include_body: bool,
    include_categories: bool,
    /// The bound of the round's initial query, kept by its resync (`None`: the whole folder).
    received_since: Option<DateTime<Utc>>,
    /// The next request, `None` once the round is done.
    next: Option<Url>,
    resynced: bool,
    pages: u32,
}

fn graph_date(moment: DateTime<Utc>) -> String {
    moment.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl MailboxClient {
    /// Starts a delta round (no request is made until the first `next_page`).
    pub fn delta_round(&self, options: DeltaOptions) -> Result<Round, GraphError> {
        let mut round = Round {
            client: self.clone(),
            mode: Mode::Delta,
            folder: options.folder,
            page_size: options.page_size.clamp(1, 1000),
            include_body: options.include_body,
            include_categories: options.include_categories,
            received_since: None,
            next: None,
            resynced: false,
            pages: 0,
        };
        round.next = Some(match options.start {
            DeltaStart::Initial { received_since } => {
                // A resync of a bounded first round repeats the same query.
                round.received_since = received_since;
                round.initial_delta_url()?
            }
            DeltaStart::Link(link) => match self.trusted_link(&link) {
                Ok(url) => url,
                Err(error) => {
                    // A stored cursor from another Graph host (the configuration changed) is
                    // as good as expired.
                    tracing::warn!(mailbox = %self.mailbox(), folder = %round.folder, %error, "stored delta link unusable: resyncing");
                    round.resynced = true;
                    round.initial_delta_url()?
                }
            },
        });
        Ok(round)
    }

    /// Starts a received-time round (the fallback mode).
    pub fn received_since_round(&self, options: ListOptions) -> Result<Round, GraphError> {
        let page_size = options.page_size.clamp(1, 1000);
        let mut url = self.url(&["mailFolders", &options.folder, "messages"])?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("$select", &select_fields(options.include_body, false));
            if let Some(since) = options.since {
                // The ordered property leads the filter, as Graph requires.
                query.append_pair(
                    "$filter",
                    &format!("receivedDateTime ge {}", graph_date(since)),
                );
            }
            query.append_pair("$orderby", "receivedDateTime asc");
            query.append_pair("$top", &page_size.to_string());
        }
        Ok(Round {
            client: self.clone(),
            mode: Mode::List,
            folder: options.folder,
            page_size,
            include_body: options.include_body,
            include_categories: false,
            received_since: None,
            next: Some(url),
            resynced: false,
            pages: 0,
        })
    }
}

impl Round {
    /// The round's first request: also where a resync starts over.
    fn initial_delta_url(&self) -> Result<Url, GraphError> {
        let mut url = self
            .client
            .url(&["mailFolders", &self.folder, "messages", "delta"])?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair(
                "$select",
                &select_fields(self.include_body, self.include_categories),
            );
            if let Some(since) = self.received_since {
                query.append_pair(
                    "$filter",
                    &format!("receivedDateTime ge {}", graph_date(since)),
                );
            }
        }
        Ok(url)
    }

    /// Pages fetched so far.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Whether the round restarted from a resync.
    pub fn resynced(&self) -> bool {
        self.resynced
    }

    /// Whether the last page was returned.
    pub fn is_done(&self) -> bool {
        self.next.is_none()
    }

    /// The next page, or `None` once the round is done. After an error the round stays where
    /// it was: calling again retries the same request.
    pub async fn next_page(&mut self) -> Result<Option<Page>, GraphError> {
        loop {
            let Some(url) = self.next.clone() else {
                return Ok(None);
            };
            let call = Call {
                method: Method::GET,
                url,
                prefer: match self.mode {
                    Mode::Delta => vec![format!("odata.maxpagesize={}", self.page_size)],
                    Mode::List => Vec::new(),
                },
                body: None,
                weight: 1,
            };
            let reply = match self.client.execute(&call).await {
                Ok(reply) => reply,
                Err(GraphError::ResyncRequired { code, .. })
                    if self.mode == Mode::Delta && !self.resynced =>
                {
                    tracing::warn!(
                        mailbox = %self.client.mailbox(),
                        folder = %self.folder,
                        code = %code,
                        since = ?self.received_since,
                        "delta cursor expired: resyncing"
                    );
                    self.resynced = true;
                    self.next = Some(self.initial_delta_url()?);
                    continue;
                }
                // On a folder, "item not found" means the folder itself is missing.
                Err(GraphError::ItemNotFound {
                    message,
                    request_id,
                }) => {
                    return Err(GraphError::MailboxNotFound {
                        code: "ErrorItemNotFound".into(),
                        message: format!("folder {:?}: {message}", self.folder),
                        request_id,
                    });
                }
                Err(error) => return Err(error),
            };
            let page = self.parse_page(&reply.body, reply.request_id)?;
            self.pages += 1;
            self.next = match &page.link {
                PageLink::Next(link) => Some(self.client.trusted_link(link)?),
                PageLink::Delta(_) | PageLink::End => None,
            };
            return Ok(Some(page));
        }
    }

    fn parse_page(&self, body: &[u8], request_id: Option<String>) -> Result<Page, GraphError> {
        let malformed = |message: &str| GraphError::MalformedResponse {
            message: message.to_string(),
            request_id: request_id.clone(),
        };
        let value: Value =
            serde_json::from_slice(body).map_err(|_| malformed("page is not valid JSON"))?;
        let Value::Object(mut object) = value else {
            return Err(malformed("page is not a JSON object"));
        };
        let Some(Value::Array(items)) = object.remove("value") else {
            return Err(malformed("page has no `value` array"));
        };
        let link_of = |name: &str| object.get(name).and_then(Value::as_str).map(str::to_string);
        let link = match (
            self.mode,
            link_of("@odata.nextLink"),
            link_of("@odata.deltaLink"),
        ) {
            (_, Some(next), _) => PageLink::Next(next),
            (Mode::Delta, None, Some(delta)) => PageLink::Delta(delta),
            (Mode::Delta, None, None) => {
                return Err(malformed("delta page without nextLink or deltaLink"));
            }
            (Mode::List, None, _) => PageLink::End,
        };
        let max_body = self.client.graph().config().max_body_chars;
        let mut messages = Vec::with_capacity(items.len());
        let mut skipped = 0;
        for item in items {
            match Message::from_value(item, max_body) {
                Ok(message) => messages.push(message),
                Err(reason) => {
                    skipped += 1;
                    tracing::warn!(mailbox = %self.client.mailbox(), folder = %self.folder, %reason, "skipped an unreadable page item");
                }
            }
        }
        Ok(Page {
            messages,
            link,
            skipped,
            resynced: self.resynced,
            request_id,
        })
    }
}
