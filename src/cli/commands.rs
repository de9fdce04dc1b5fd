//! The incident commands, `mailpoll tasks …` and `mailpoll messages …`: arguments, and what
//! each prints given a database. `main` only connects and prints.

use std::collections::HashMap;
use std::str::FromStr;

use clap::{Args, Subcommand, ValueEnum};
use sqlx::PgPool;
use uuid::Uuid;

use super::{messages, tasks};
use crate::identity;
use crate::ledger::{self, DeliveryState};
use crate::queue::{self, QueueError, TaskFilter, TaskSelection, TaskState};

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List tasks, newest first.
    List(TaskListArgs),
    /// Show one task in full: its MailboxPoll, payload, attempts and last error.
    Show(TaskShowArgs),
    /// Bring dead tasks back to pending with a full set of attempts: the tasks named by id, or
    /// every dead task matching --kind and --mailboxpoll.
    Retry(TaskBulkArgs),
    /// Cancel pending or dead tasks (a running task is left to finish): the tasks named by id,
    /// or every one matching --kind and --mailboxpoll.
    Cancel(TaskBulkArgs),
}

#[derive(Debug, Subcommand)]
pub enum MessagesCommand {
    /// List a MailboxPoll's messages, newest first.
    List(MessageListArgs),
}

#[derive(Debug, Args)]
pub struct TaskListArgs {
    /// Only tasks in this state: pending, running, succeeded, dead or cancelled.
    #[arg(long)]
    pub state: Option<TaskState>,
    /// Only tasks of this kind (poll, deliver, actions).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only tasks of this MailboxPoll, as namespace/name.
    #[arg(long)]
    pub mailboxpoll: Option<MailboxPollName>,
    /// Show at most this many tasks.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct TaskShowArgs {
    /// The task's id, as `mailpoll tasks list` shows it.
    pub id: i64,
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct TaskBulkArgs {
    /// Task ids; without any, every task matching the filters (which need --all when none
    /// is given, so a bare command never touches the whole queue).
    pub ids: Vec<i64>,
    /// Only tasks of this kind (poll, deliver, actions).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only tasks of this MailboxPoll, as namespace/name.
    #[arg(long)]
    pub mailboxpoll: Option<MailboxPollName>,
    /// Every matching task of the queue, no filter.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct MessageListArgs {
    /// The MailboxPoll, as namespace/name.
    #[arg(long)]
    pub mailboxpoll: MailboxPollName,
    /// Only messages in this delivery state.
    #[arg(long, value_enum)]
    pub state: Option<MessageState>,
    /// Show at most this many messages.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// A ledger state, as `--state` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MessageState {
    None,
    Pending,
    Delivered,
    Failed,
    Skipped,
    Filtered,
}

impl From<MessageState> for DeliveryState {
    fn from(state: MessageState) -> Self {
        match state {
            MessageState::None => DeliveryState::None,
            MessageState::Pending => DeliveryState::Pending,
            MessageState::Delivered => DeliveryState::Delivered,
            MessageState::Failed => DeliveryState::Failed,
            MessageState::Skipped => DeliveryState::Skipped,
            MessageState::Filtered => DeliveryState::Filtered,
        }
    }
}

/// `namespace/name` of a MailboxPoll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxPollName {
    pub namespace: String,
    pub name: String,
}

impl FromStr for MailboxPollName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{text:?} is not namespace/name")),
        }
    }
}

/// Why a command could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot encode the output: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("no task {0}")]
    NoSuchTask(i64),
    #[error("task {id} is {state}: {rule} ({done} other task(s) done)")]
    WrongState {
        id: i64,
        state: TaskState,
        rule: &'static str,
        /// What the same command did to the other tasks.
        done: usize,
    },
    #[error("no MailboxPoll {0} is known to the database (it has never been polled)")]
    UnknownMailboxPoll(String),
    #[error("name task ids, or filter with --kind or --mailboxpoll, or pass --all")]
    Unbounded,
}

/// Runs a `tasks` command; returns what to print.
pub async fn tasks(pool: &PgPool, command: TasksCommand) -> Result<String, CommandError> {
    match command {
        TasksCommand::List(args) => {
            let filter = TaskFilter {
                state: args.state,
                kind: args.kind,
                owners: owners(pool, args.mailboxpoll.as_ref()).await?,
                limit: args.limit,
            };
            let found = queue::list(pool, &filter).await?;
            match args.output {
                OutputFormat::Table => Ok(tasks::render_table(
                    &found,
                    &names(pool, found.iter().filter_map(|t| t.owner_uid)).await?,
                )),
                OutputFormat::Json => Ok(serde_json::to_string_pretty(&found)? + "\n"),
            }
        }
        TasksCommand::Show(args) => {
            let task = queue::get(pool, args.id)
                .await?
                .ok_or(CommandError::NoSuchTask(args.id))?;
            match args.output {
                OutputFormat::Table => Ok(tasks::render_task(
                    &task,
                    &names(pool, task.owner_uid).await?,
                )),
                OutputFormat::Json => Ok(serde_json::to_string_pretty(&task)? + "\n"),
            }
        }
        TasksCommand::Retry(args) => {
            let named = args.ids.clone();
            let report = queue::retry_dead_matching(pool, &selection(pool, args).await?).await?;
            let touched: Vec<i64> = report
                .revived
                .iter()
                .chain(&report.superseded)
                .copied()
                .collect();
            untouched(pool, &named, &touched, "only dead tasks can be retried").await?;
            let mut out = format!("{} dead task(s) pending again", report.revived.len());
            if !report.superseded.is_empty() {
                out.push_str(&format!(
                    "; {} cancelled instead, another task of theirs is live: {:?}",
                    report.superseded.len(),
                    report.superseded
                ));
            }
            Ok(out + "\n")
        }
        TasksCommand::Cancel(args) => {
            let named = args.ids.clone();
            let cancelled = queue::cancel_matching(pool, &selection(pool, args).await?).await?;
            untouched(
                pool,
                &named,
                &cancelled,
                "only pending or dead tasks can be cancelled",
            )
            .await?;
            Ok(format!("{} task(s) cancelled\n", cancelled.len()))
        }
    }
}

/// Runs a `messages` command; returns what to print.
pub async fn messages(pool: &PgPool, command: MessagesCommand) -> Result<String, CommandError> {
    let MessagesCommand::List(args) = command;
    let ledgers =
        identity::ledgers_of(pool, &args.mailboxpoll.namespace, &args.mailboxpoll.name).await?;
    if ledgers.is_empty() {
        return Err(CommandError::UnknownMailboxPoll(display(&args.mailboxpoll)));
    }
    let identities: Vec<Uuid> = ledgers.iter().map(|l| l.identity).collect();
    let found = ledger::list(pool, &identities, args.state.map(Into::into), args.limit).await?;
    match args.output {
        OutputFormat::Table => Ok(messages::render_table(&found)),
        OutputFormat::Json => Ok(serde_json::to_string_pretty(&found)? + "\n"),
    }
}

/// Tasks named on the command line that the command left alone are an error: saying why
/// (no such task, or its state) beats a silent "0 done".
async fn untouched(
    pool: &PgPool,
    named: &[i64],
    touched: &[i64],
    rule: &'static str,
) -> Result<(), CommandError> {
    let Some(&id) = named.iter().find(|id| !touched.contains(id)) else {
        return Ok(());
    };
    let Some(task) = queue::get(pool, id).await? else {
        return Err(CommandError::NoSuchTask(id));
    };
    Err(CommandError::WrongState {
        id,
        state: task.state,
        rule,
        done: touched.len(),
    })
}

async fn selection(pool: &PgPool, args: TaskBulkArgs) -> Result<TaskSelection, CommandError> {
    if args.ids.is_empty() && args.kind.is_none() && args.mailboxpoll.is_none() && !args.all {
        return Err(CommandError::Unbounded);
    }
    Ok(TaskSelection {
        ids: (!args.ids.is_empty()).then_some(args.ids),
        kind: args.kind,
        owners: owners(pool, args.mailboxpoll.as_ref()).await?,
    })
}

/// The object uids of a MailboxPoll named on the command line.
async fn owners(
    pool: &PgPool,
    name: Option<&MailboxPollName>,
) -> Result<Option<Vec<Uuid>>, CommandError> {
    let Some(name) = name else {
        return Ok(None);
    };
    let ledgers = identity::ledgers_of(pool, &name.namespace, &name.name).await?;
    if ledgers.is_empty() {
        return Err(CommandError::UnknownMailboxPoll(display(name)));
    }
    Ok(Some(ledgers.iter().map(|l| l.uid).collect()))
}

async fn names(
    pool: &PgPool,
    uids: impl IntoIterator<Item = Uuid>,
) -> Result<HashMap<Uuid, String>, CommandError> {
    let uids: Vec<Uuid> = uids.into_iter().collect();
    Ok(identity::names_of(pool, &uids).await?)
}

fn display(name: &MailboxPollName) -> String {
    format!("{}/{}", name.namespace, name.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_poll_names_are_namespace_slash_name() {
        assert_eq!(
            "support/inbox".parse(),
            Ok(MailboxPollName {
                namespace: "support".into(),
                name: "inbox".into()
            })
        );
        for bad in ["inbox", "/inbox", "support/", "a/b/c"] {
            assert!(bad.parse::<MailboxPollName>().is_err(), "{bad}");
        }
    }
}
