// A real HDFS for the tests: one NameNode and one DataNode on 127.0.0.1 (Hadoop's MiniDFSCluster,
// from the hadoop-client-minicluster jar that tests/hdfs/pom.xml resolves). Run as a single-file
// source program:
//
//   java -cp '.work/hdfs-jars/*' tests/hdfs/HdfsCluster.java BASE_DIR [NAMENODE_PORT]
//
// NAMENODE_PORT 0 (the default) lets the NameNode pick a free port. Once the cluster is up it
// prints one line "HDFS_URI hdfs://127.0.0.1:PORT", then reads commands from stdin, one a line,
// and answers each with "OK <command>" (or "ERROR <command>: <why>"):
//   stop-datanode    stop the DataNode (its blocks stay on disk; the NameNode still lists it)
//   start-datanode   start it again on the same ports and wait until the NameNode sees it
//   quit             shut the cluster down and exit (also on end of input or SIGTERM)
import java.io.BufferedReader;
import java.io.File;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.atomic.AtomicBoolean;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.MiniDFSCluster;

public class HdfsCluster {
    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: HdfsCluster BASE_DIR [NAMENODE_PORT]");
            System.exit(2);
        }
        File base = new File(args[0]).getAbsoluteFile();
        int port = args.length > 1 ? Integer.parseInt(args[1]) : 0;
        Configuration conf = new Configuration();
        conf.set("dfs.replication", "1");
        conf.setBoolean("dfs.permissions.enabled", false);  // any local user may write (Spark, Python clients)
        conf.set("dfs.namenode.http-address", "127.0.0.1:0");
        conf.set("dfs.datanode.address", "127.0.0.1:0");
        conf.set("dfs.datanode.http.address", "127.0.0.1:0");
        conf.set("dfs.datanode.ipc.address", "127.0.0.1:0");
        // Block locations name the DataNode "localhost", which Spark takes for "no preference" (as
        // with S3A). Named 127.0.0.1, tasks prefer a host that runs no executor (the driver's is
        // the machine's address), and local-mode Spark was seen to stall on delay scheduling.
        conf.set("dfs.datanode.hostname", "localhost");
        // a stopped DataNode must make writes fail at once, not after minutes of retries
        conf.setInt("dfs.client.block.write.retries", 1);
        conf.setInt("ipc.client.connect.max.retries", 1);
        MiniDFSCluster cluster = new MiniDFSCluster.Builder(conf, base)
                .nameNodePort(port)
                .nameNodeHttpPort(0)
                .numDataNodes(1)
                .format(true)
                .checkDataNodeAddrConfig(true)
                .checkDataNodeHostConfig(true)
                .build();
        cluster.waitActive();
        AtomicBoolean down = new AtomicBoolean(false);
        Runnable shutdown = () -> {
            if (down.compareAndSet(false, true)) {
                cluster.shutdown(true);
            }
        };
        Runtime.getRuntime().addShutdownHook(new Thread(shutdown));  // SIGTERM
        System.out.println("HDFS_URI hdfs://127.0.0.1:" + cluster.getNameNodePort());
        System.out.flush();

        MiniDFSCluster.DataNodeProperties stopped = null;
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line; (line = in.readLine()) != null; ) {
            String command = line.trim();
            if (command.isEmpty()) {
                continue;
            }
            if (command.equals("quit")) {
                break;
            }
            try {
                if (command.equals("stop-datanode")) {
                    if (stopped == null) {
                        stopped = cluster.stopDataNode(0);
                    }
                } else if (command.equals("start-datanode")) {
                    if (stopped != null) {
                        cluster.restartDataNode(stopped, true);
                        stopped = null;
                    }
                    cluster.waitActive();
                    cluster.triggerBlockReports();
                } else {
                    throw new IllegalArgumentException("unknown command");
                }
                System.out.println("OK " + command);
            } catch (Exception e) {
                System.out.println("ERROR " + command + ": " + String.valueOf(e).replace('\n', ' '));
            }
            System.out.flush();
        }
        shutdown.run();
        System.out.println("OK quit");
        System.out.flush();
        System.exit(0);
    }
}
