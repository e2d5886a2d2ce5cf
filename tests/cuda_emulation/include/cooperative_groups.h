// Stands in for the CUDA toolkit's cooperative_groups.h: the thread-block cluster of the running
// block (sm_90), backed by the emulator (cuda_emulation.h).
#pragma once

#include "../cuda_emulation.h"

namespace cooperative_groups {

class cluster_group {
 public:
  // The cluster barrier: every live thread of every block of the cluster.
  void sync(const cuda_emu::Site& site = cuda_emu::Site::current()) const {
    cuda_emu::cluster_sync(site);
  }
  unsigned block_rank() const { return cuda_emu::cluster_block_rank(); }
  unsigned num_blocks() const { return cuda_emu::cluster_blocks(); }
  // The same place in block `rank`'s shared memory as `addr` in this block's.
  template <typename T>
  T* map_shared_rank(T* addr, int rank,
                     const cuda_emu::Site& site = cuda_emu::Site::current()) const {
    return static_cast<T*>(cuda_emu::map_shared_rank(addr, rank, site));
  }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
