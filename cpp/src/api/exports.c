/* libdbrx.so is dbrx_core linked whole; this translation unit only gives the shared library
 * target a source of its own. The exported symbols are the DBRX_API functions of dbrx.h. */
#include "dbrx/dbrx.h"
