//! The loader's pool: threads that work through the plan's requests ahead of training,
//! assembling micro-batches in any order and delivering them in request order, with at most
//! `prefetch_bytes` of batches in flight (back-pressure), and a panic in the data path turned
//! into an error for the trainer instead of a wait.

use super::{BatchRequest, Dataset, LoadError, MicroBatch, assemble_into};
use crate::batch::{HostMemory, PixelFormat, plain_memory};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

/// What a caught panic says.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

type Requests = std::iter::Peekable<Box<dyn Iterator<Item = BatchRequest> + Send>>;

struct Queue {
    requests: Requests,
    exhausted: bool,
    done: BTreeMap<u64, Result<MicroBatch, LoadError>>,
    /// A thread panicked while taking the next request (the plan itself failed): no request
    /// after it will come.
    failed: Option<String>,
    /// Bytes of each requested, not yet delivered batch.
    sizes: BTreeMap<u64, usize>,
    next_request: u64,
    next_delivery: u64,
    closed: bool,
}

fn batch_bytes(request: &BatchRequest) -> usize {
    let per_value = match request.pixels {
        PixelFormat::Bytes => 1,
        PixelFormat::Normalized { .. } => std::mem::size_of::<f32>(),
    };
    request.ids.len() * 3 * request.transform.size().pow(2) as usize * per_value
}

/// Assembles micro-batches on a pool of threads, ahead of time and in order.
pub struct Loader {
    state: Arc<(Mutex<Queue>, Condvar)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Works through `requests` (the plan's micro-batches, in training order) on `threads`
    /// threads. Batches in flight or waiting for the trainer are held to `prefetch_bytes`
    /// (one batch always proceeds): the threads stop pulling requests until the trainer takes
    /// batches (back-pressure).
    pub fn new(
        dataset: Arc<Dataset>,
        threads: usize,
        prefetch_bytes: usize,
        requests: impl Iterator<Item = BatchRequest> + Send + 'static,
    ) -> Loader {
        Loader::with_memory(dataset, threads, prefetch_bytes, requests, plain_memory())
    }

    /// [`Loader::new`], writing the bytes of [`PixelFormat::Bytes`] batches into `memory`'s
    /// buffers (page-locked ones, for uploads to a GPU that do not wait).
    pub fn with_memory(
        dataset: Arc<Dataset>,
        threads: usize,
        prefetch_bytes: usize,
        requests: impl Iterator<Item = BatchRequest> + Send + 'static,
        memory: HostMemory,
    ) -> Loader {
        let boxed: Box<dyn Iterator<Item = BatchRequest> + Send> = Box::new(requests);
        let state = Arc::new((
            Mutex::new(Queue {
                requests: boxed.peekable(),
                exhausted: false,
                done: BTreeMap::new(),
                sizes: BTreeMap::new(),
                next_request: 0,
                next_delivery: 0,
                closed: false,
                failed: None,
            }),
            Condvar::new(),
        ));
        let workers = (0..threads.max(1))
            .map(|_| {
                let (state, dataset, memory) = (state.clone(), dataset.clone(), memory.clone());
                std::thread::spawn(move || {
                    let (lock, ready) = &*state;
                    loop {
                        let (seq, request) = {
                            let mut q = lock.lock().expect("loader lock");
                            loop {
                                if q.closed || q.exhausted {
                                    return;
                                }
                                let in_flight: usize = q.sizes.values().sum();
                                // The plan's iterator runs here, under the lock: a panic in
                                // it ends the requests with an error, not a hang (and, caught
                                // here, poisons nothing).
                                let peeked =
                                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                        q.requests.peek().map(batch_bytes)
                                    }));
                                let admit = match peeked {
                                    Err(panic) => {
                                        q.failed = Some(panic_message(panic));
                                        q.exhausted = true;
                                        ready.notify_all();
                                        return;
                                    }
                                    Ok(None) => {
                                        q.exhausted = true;
                                        ready.notify_all();
                                        return;
                                    }
                                    Ok(Some(bytes)) => {
                                        in_flight == 0 || in_flight + bytes <= prefetch_bytes
                                    }
                                };
                                if admit {
                                    let request = q.requests.next().expect("peeked");
                                    let seq = q.next_request;
                                    q.next_request += 1;
                                    q.sizes.insert(seq, batch_bytes(&request));
                                    break (seq, request);
                                }
                                q = ready.wait(q).expect("loader lock");
                            }
                        };
                        let batch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            assemble_into(&dataset, &request, &memory)
                        }))
                        .unwrap_or_else(|panic| Err(LoadError::Panicked(panic_message(panic))));
                        lock.lock().expect("loader lock").done.insert(seq, batch);
                        ready.notify_all();
                    }
                })
            })
            .collect();
        Loader {
            state,
            threads: workers,
        }
    }

    /// The next micro-batch in request order; `None` once every request was delivered. A
    /// thread of the data path that panicked makes this an error, never a wait.
    pub fn next(&self) -> Option<Result<MicroBatch, LoadError>> {
        let (lock, ready) = &*self.state;
        let mut q = lock.lock().expect("loader lock");
        loop {
            let seq = q.next_delivery;
            if let Some(batch) = q.done.remove(&seq) {
                q.next_delivery += 1;
                q.sizes.remove(&seq);
                ready.notify_all();
                return Some(batch);
            }
            if q.exhausted && q.next_delivery == q.next_request {
                return q.failed.take().map(|why| Err(LoadError::Panicked(why)));
            }
            q = ready.wait(q).expect("loader lock");
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.state.0.lock().expect("loader lock").closed = true;
        self.state.1.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
