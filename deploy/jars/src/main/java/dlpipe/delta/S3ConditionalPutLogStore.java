package dlpipe.delta;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.Iterator;

import io.delta.storage.HadoopFileSystemLogStore;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.FSDataOutputStream;
import org.apache.hadoop.fs.FSDataOutputStreamBuilder;
import org.apache.hadoop.fs.FileSystem;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.s3a.RemoteFileChangedException;

/**
 * A Delta LogStore for S3 that is safe for concurrent writers in different processes or clusters.
 *
 * <p>Delta commits version N by creating _delta_log/N.json only if it does not exist. Delta's own
 * S3SingleDriverLogStore checks that inside one JVM only: two drivers can both "create" N.json and
 * the second silently replaces the first commit. This store makes the create itself conditional
 * (S3's PUT with If-None-Match: *, through Hadoop S3A's createFile option
 * fs.option.create.conditional.overwrite, Hadoop 3.4.2+), so the loser gets
 * java.nio.file.FileAlreadyExistsException and Delta retries its commit as the next version or
 * reports a conflict. This is the same guarantee delta-rs commits with on S3.
 */
public class S3ConditionalPutLogStore extends HadoopFileSystemLogStore {
    static final String CONDITIONAL = "fs.option.create.conditional.overwrite";

    public S3ConditionalPutLogStore(Configuration hadoopConf) {
        super(hadoopConf);
    }

    @Override
    public void write(Path path, Iterator<String> actions, Boolean overwrite, Configuration hadoopConf)
            throws IOException {
        FileSystem fs = path.getFileSystem(hadoopConf);
        FSDataOutputStreamBuilder<?, ?> builder = fs.createFile(path).overwrite(overwrite);
        if (!overwrite) {
            builder.must(CONDITIONAL, true);
        }
        try (FSDataOutputStream out = builder.build()) {
            while (actions.hasNext()) {
                out.write((actions.next() + "\n").getBytes(StandardCharsets.UTF_8));
            }
        } catch (org.apache.hadoop.fs.FileAlreadyExistsException | RemoteFileChangedException e) {
            // 412 Precondition Failed: another writer created this version first
            throw new java.nio.file.FileAlreadyExistsException(path.toString());
        }
    }

    @Override
    public Boolean isPartialWriteVisible(Path path, Configuration hadoopConf) {
        return false;  // an S3 object appears whole, at close
    }
}
