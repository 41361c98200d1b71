//! How the ranks of a generation reach each other: each rank opens its side before the
//! rendezvous (a ring listener, or rank 0's NCCL unique id) and publishes what the others need;
//! with every rank's payload it joins the generation's collective.

use ladder_collective::Collective;
use ladder_collective::nccl::{self, NcclCommunicator};
use ladder_collective::ring::TcpRing;
use ladder_train::trainer::TrainError;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;
use tch::Device;

/// How the ranks of a generation reach each other: the TCP ring on CPU, NCCL on CUDA; a
/// generation of one rank reaches no one.
pub enum Transport {
    Alone,
    /// This rank's ring listener, bound before its address is published.
    Ring(TcpListener),
    Nccl {
        device: i32,
    },
}

impl Transport {
    /// Prepares this rank's side and what it publishes in the rendezvous: its ring address,
    /// or (rank 0 on CUDA) the NCCL unique id; nothing in a world of one.
    pub fn open(
        device: Device,
        ring_host: &str,
        rank: u32,
        world: u32,
    ) -> Result<(Transport, Vec<u8>), String> {
        if world == 1 {
            return Ok((Transport::Alone, Vec::new()));
        }
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
            Transport::Alone => Box::new(ladder_collective::Alone),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_of_one_opens_nothing_and_exchanges_nothing() {
        // On CUDA too: no NCCL unique id is made (none could be here, without a GPU or NCCL).
        for device in [Device::Cpu, Device::Cuda(0)] {
            let (transport, payload) = Transport::open(device, "127.0.0.1", 0, 1).unwrap();
            assert!(matches!(transport, Transport::Alone) && payload.is_empty());
            let mut collective = transport
                .connect(0, &[payload], 1, b"key", Duration::from_secs(1))
                .unwrap_or_else(|_| panic!("a world of one joins at once"));
            assert_eq!((collective.rank(), collective.world_size()), (0, 1));
            let mut data = [1.5f32, -2.0];
            collective.all_reduce_sum(&mut data).unwrap();
            assert_eq!(data, [1.5, -2.0], "its own sum");
        }
    }
}
