//! Request bodies held in memory, bounded. Every endpoint a runner pod can reach (the model
//! gateway, the runners' report, log and diff endpoints) checks the caller's token before it
//! reads a byte of the body, and then reads it against budgets of bytes: its execution's and
//! the whole process's. A full budget refuses at once (the caller retries later) rather than
//! queueing bodies in memory, so what all runner pods together can make the controller hold is
//! the sum of the process budgets (README, "Security"; BENCHMARKS.md measures it).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes the model gateway may hold of request bodies, all executions together.
pub const GATEWAY_BYTES: usize = 160 * 1024 * 1024;
/// Bytes of request bodies one execution may have in the gateway at once.
pub const EXECUTION_BYTES: usize = 48 * 1024 * 1024;
/// Bytes of request bodies one namespace's executions may have in the gateway at once: one
/// tenant cannot take the whole process budget.
pub const NAMESPACE_BYTES: usize = 96 * 1024 * 1024;
/// Bytes the runners' report, log and diff endpoints may hold at once, all runners together.
pub const RUNNER_ENDPOINT_BYTES: usize = 24 * 1024 * 1024;
/// How long a body may take to arrive whole: a sender that trickles (or stops) gives its room
/// back after this, rather than holding it for as long as its run lasts.
pub const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A budget of bytes, counted in KiB.
#[derive(Clone)]
pub struct BodyBudget {
    kib: Arc<Semaphore>,
}

/// Why a body was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Over the endpoint's limit.
    TooLarge,
    /// A budget is spent by bodies in flight: try again later.
    Busy,
    /// The body broke off.
    Broken(String),
    /// The body did not arrive whole within `BODY_DEADLINE`.
    TooSlow,
}

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        Self { kib: Arc::new(Semaphore::new(bytes.div_ceil(1024))) }
    }

    /// KiB free now.
    pub fn available_kib(&self) -> usize {
        self.kib.available_permits()
    }
}

/// What a read body holds of its budgets, until dropped.
pub struct Held(#[allow(dead_code)] Vec<OwnedSemaphorePermit>);

/// Reads `body` (at most `limit` bytes, whole within `BODY_DEADLINE`) taking room from every
/// budget as chunks arrive; a `Content-Length` over the limit is refused before anything is read.
pub async fn read(
    body: Body,
    declared: Option<u64>,
    limit: usize,
    budgets: &[&BodyBudget],
) -> Result<(Bytes, Held), BodyError> {
    read_within(body, declared, limit, budgets, BODY_DEADLINE).await
}

/// `read`, with the deadline given.
pub async fn read_within(
    body: Body,
    declared: Option<u64>,
    limit: usize,
    budgets: &[&BodyBudget],
    deadline: std::time::Duration,
) -> Result<(Bytes, Held), BodyError> {
    tokio::time::timeout(deadline, read_all(body, declared, limit, budgets)).await.unwrap_or(Err(BodyError::TooSlow))
}

async fn read_all(
    body: Body,
    declared: Option<u64>,
    limit: usize,
    budgets: &[&BodyBudget],
) -> Result<(Bytes, Held), BodyError> {
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut held: Vec<OwnedSemaphorePermit> = Vec::new();
    let mut taken_kib = 0usize;
    let mut take = |held: &mut Vec<OwnedSemaphorePermit>, bytes: usize| -> Result<(), BodyError> {
        let need = bytes.div_ceil(1024);
        if need > taken_kib {
            let more = u32::try_from(need - taken_kib).map_err(|_| BodyError::TooLarge)?;
            for b in budgets {
                held.push(b.kib.clone().try_acquire_many_owned(more).map_err(|_| BodyError::Busy)?);
            }
            taken_kib = need;
        }
        Ok(())
    };
    // A declared length is room taken before anything is read (and allocated once, not grown by
    // doubling); without one, the room grows with what arrives.
    let mut data: Vec<u8> = match declared {
        Some(n) => {
            take(&mut held, n as usize)?;
            Vec::with_capacity(n as usize)
        }
        None => Vec::new(),
    };
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Broken(e.to_string()))?;
        if data.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        data.extend_from_slice(&chunk);
        take(&mut held, data.capacity())?;
    }
    Ok((Bytes::from(data), Held(held)))
}

/// The `Content-Length` a request declares.
pub fn declared_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers.get(axum::http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_take_room_from_every_budget_and_give_it_back() {
        let (process, execution) = (BodyBudget::new(1024 * 1024), BodyBudget::new(300 * 1024));
        let body = || Body::from(vec![7u8; 200 * 1024]);
        let (first, held) = read(body(), None, 1 << 20, &[&process, &execution]).await.unwrap();
        assert_eq!(first.len(), 200 * 1024);
        assert!(execution.available_kib() <= 100, "{}", execution.available_kib());
        // The execution's budget is spent: refused at once, nothing queued.
        assert_eq!(read(body(), None, 1 << 20, &[&process, &execution]).await.err(), Some(BodyError::Busy));
        drop(held);
        assert_eq!(execution.available_kib(), 300);
        assert_eq!(process.available_kib(), 1024, "a refused body gave its room back");
        // Over the limit, declared or not.
        assert_eq!(read(body(), Some(300 * 1024), 100 * 1024, &[&process]).await.err(), Some(BodyError::TooLarge));
        assert_eq!(read(body(), None, 100 * 1024, &[&process]).await.err(), Some(BodyError::TooLarge));
    }

    #[tokio::test]
    async fn a_body_that_trickles_gives_its_room_back_at_the_deadline() {
        let budget = BodyBudget::new(1024 * 1024);
        // One byte, then nothing: a sender holding its declared room.
        let stalled = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{")) })
            .chain(futures::stream::pending());
        let started = std::time::Instant::now();
        let got = read_within(
            Body::from_stream(stalled),
            Some(512 * 1024),
            1 << 20,
            &[&budget],
            std::time::Duration::from_millis(200),
        )
        .await;
        assert_eq!(got.err(), Some(BodyError::TooSlow));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(budget.available_kib(), 1024, "its room is back");
    }
}
