//! How the ranks of a generation reach each other: each rank opens its side before the
//! rendezvous (a ring listener, or rank 0's NCCL unique id) and publishes what the others need;
//! with every rank's payload it joins the generation's collective.

use crate::trainer::TrainError;
use ladder_collective::Collective;
use ladder_collective::nccl::{self, NcclCommunicator};
use ladder_collective::ring::TcpRing;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;
use tch::Device;

/// How the ranks of a generation reach each other: the TCP ring on CPU, NCCL on CUDA.
pub enum Transport {
    /// This rank's ring listener, bound before its address is published.
    Ring(TcpListener),
    Nccl {
        device: i32,
    },
}

impl Transport {
    /// Prepares this rank's side and what it publishes in the rendezvous: its ring address,
    /// or (rank 0 on CUDA) the NCCL unique id.
    pub fn open(
        device: Device,
        ring_host: &str,
        rank: u32,
    ) -> Result<(Transport, Vec<u8>), String> {
        match device {
            Device::Cuda(device) => {
                let payload = if rank == 0 {
                    nccl::unique_id().map_err(|e| e.to_string())?.to_vec()
                } else {
                    Vec::new()
                };
                Ok((
                    Transport::Nccl {
                        device: device as i32,
                    },
                    payload,
                ))
            }
            _ => {
                let listener = TcpListener::bind((ring_host, 0))
                    .map_err(|e| format!("cannot listen on {ring_host}: {e}"))?;
                let address = listener
                    .local_addr()
                    .map_err(|e| format!("the ring listener has no address: {e}"))?;
                Ok((Transport::Ring(listener), address.to_string().into_bytes()))
            }
        }
    }

    /// Joins the generation's collective from every rank's published payload.
    pub fn connect(
        self,
        rank: u32,
        payloads: &[Vec<u8>],
        generation: u64,
        ring_key: &[u8],
        timeout: Duration,
    ) -> Result<Box<dyn Collective>, TrainError> {
        let world = payloads.len() as u32;
        Ok(match self {
            Transport::Ring(listener) => {
                let addresses = payloads
                    .iter()
                    .enumerate()
                    .map(|(r, p)| {
                        String::from_utf8_lossy(p)
                            .parse::<SocketAddr>()
                            .map_err(|e| {
                                TrainError::Fatal(format!(
                                    "rank {r} published an unusable ring address {p:?}: {e}"
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Box::new(TcpRing::connect(
                    rank, listener, &addresses, generation, ring_key, timeout,
                )?)
            }
            Transport::Nccl { device } => Box::new(NcclCommunicator::init(
                rank,
                world,
                &payloads[0],
                device,
                timeout,
            )?),
        })
    }
}
