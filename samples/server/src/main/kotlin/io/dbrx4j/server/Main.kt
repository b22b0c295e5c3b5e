package io.dbrx4j.server

import io.dbrx4j.Dbrx
import kotlin.system.exitProcess

/** `java -jar dbrx4j-server-all.jar --model-dir DIR [--port 8000] [--api-key KEY] ...` */
object Main {
    @JvmStatic
    fun main(args: Array<String>) {
        if (args.any { it == "--help" || it == "-h" }) {
            print(ServerConfig.usage())
            return
        }
        val config = try {
            ServerConfig.parse(args)
        } catch (e: IllegalArgumentException) {
            System.err.println(e.message)
            exitProcess(2)
        }
        val host = ModelHost { Dbrx.load(config.modelDir, config.loadOptions()) }
        val server = DbrxServer(config, host)
        Runtime.getRuntime().addShutdownHook(Thread { server.close() })
        host.start()
        val port = server.start()
        System.err.println("dbrx4j server on http://${config.host}:$port serving '${config.modelName}' from ${config.modelDir}")
        server.awaitTermination()
    }
}
