// Narrowing checks shared by the kernels (host and device): an int64 token id above 2^31 - 1
// written to an int32 output would wrap silently under a C cast.
#pragma once

#include "common/macros.h"

namespace mixtape {

// Whether `v` survives the conversion to Out.
template <typename Out, typename In>
MIXTAPE_HD bool fits(In v) {
  return static_cast<In>(static_cast<Out>(v)) == v;
}

// Whether converting In to Out can change a value (only then do kernels check).
template <typename In, typename Out>
constexpr bool narrows() {
  return sizeof(Out) < sizeof(In);
}

}  // namespace mixtape
