package io.dbrx4j

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.assertThrows

/**
 * The multi-GPU load options reach dbrx_model_params and are checked there, before anything loads. The
 * checks that need no GPU run on the CPU device (Dbrx.load refuses CUDA up front on a machine without one).
 */
class ParallelOptionsTest {
    private fun opts() = Fixtures.options.toBuilder().tensorParallel(2).nodes(1).nodeRank(0)

    @Test
    fun `defaults leave devices and processes to the runtime`() {
        val o = LoadOptions.DEFAULTS
        assertEquals(emptyList<Int>(), o.devices)
        assertNull(o.rendezvous)
        assertNull(o.nodes)
        assertNull(o.nodeRank)
        val b = LoadOptions.builder().devices(0, 1).rendezvous("head:29500").nodes(2).nodeRank(1).build()
        assertEquals(listOf(0, 1), b.devices)
        assertEquals("head:29500", b.toBuilder().build().rendezvous)
        assertEquals(2, b.nodes)
        assertEquals(1, b.nodeRank)
    }

    @Test
    fun `bad device lists are refused with the field named`() {
        val twice = assertThrows<DbrxInvalidArgumentException> { Dbrx.load(Fixtures.modelDir, opts().devices(1, 1).build()) }
        assertTrue(twice.message!!.contains("lists GPU 1 twice"), twice.message)
        val negative = assertThrows<DbrxInvalidArgumentException> { Dbrx.load(Fixtures.modelDir, opts().devices(0, -2).build()) }
        assertTrue(negative.message!!.contains("params.devices[1] = -2"), negative.message)
        val cpu = assertThrows<DbrxInvalidArgumentException> { Dbrx.load(Fixtures.modelDir, opts().devices(0, 1).build()) }
        assertTrue(cpu.message!!.contains("params.devices name GPUs"), cpu.message)
        val many = assertThrows<DbrxInvalidArgumentException> {
            Dbrx.load(Fixtures.modelDir, opts().devices((0 until 17).toList()).build())
        }
        assertTrue(many.message!!.contains("params.n_devices must be in [0, 16]"), many.message)
    }

    @Test
    fun `a bad rendezvous address is refused`() {
        val e = assertThrows<DbrxInvalidArgumentException> {
            Dbrx.load(Fixtures.modelDir, opts().rendezvous("no-port").build())
        }
        assertTrue(e.message!!.contains("params.rendezvous = \"no-port\": expected host:port"), e.message)
        val rank = assertThrows<DbrxInvalidArgumentException> {
            Dbrx.load(Fixtures.modelDir, opts().nodes(2).nodeRank(5).build())
        }
        assertTrue(rank.message!!.contains("params.node_rank 5 outside [0, n_nodes 2)"), rank.message)
    }

    @Test
    fun `serveRank refuses a process that should run the engine`() {
        val e = assertThrows<DbrxInvalidArgumentException> { Dbrx.serveRank(Fixtures.modelDir, Fixtures.options) }
        assertTrue(e.message!!.contains("dbrx_model_serve is for processes with node_rank > 0"), e.message)
    }
}
