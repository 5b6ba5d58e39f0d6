package tidemark.pubsub;

import java.io.IOException;
import java.lang.reflect.Constructor;
import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.List;
import java.util.NoSuchElementException;
import java.util.Queue;
import org.apache.beam.sdk.coders.Coder;
import org.apache.beam.sdk.io.UnboundedSource;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubClient;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubUnboundedSource;
import org.apache.beam.sdk.options.PipelineOptions;
import org.apache.beam.sdk.transforms.windowing.BoundedWindow;
import org.checkerframework.checker.nullness.qual.Nullable;
import org.joda.time.Duration;
import org.joda.time.Instant;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Beam's Pub/Sub source with a watermark that trails the stamps its readers read by a short
 * delay instead of a minute.
 *
 * <p>Beam's reader (2.62.0) estimates its watermark as the lowest stamp read in the last minute,
 * so a window closes a minute after its end. With {@link EventTimeClientFactory}'s stamps (the
 * highest event time the reader has read so far, never lower than any stamp before it) the lowest
 * stamp of a period is the one at its start, and the minute is only a wait. This source keeps
 * everything of Beam's reader (pulls, acks on checkpoint finalization, redelivery, message-id
 * deduplication) and reports as watermark the higher of Beam's estimate and the highest stamp
 * read at least {@code delay} ago: a message read up to {@code delay} after a newer one is still
 * on time.
 *
 * <p>A reader that has read nothing for {@link #IDLE} reports the wall clock. Beam's reader does
 * so only once it has received a message; but Beam splits a subscription into several readers
 * (four per parallel instance), and when a backlog is pulled by some of them in large batches, the
 * others may never receive one: each would hold the job's watermark at the beginning of time, and
 * no window would ever close.
 *
 * <p>A reader that closes hands the messages it pulled but never read back to Pub/Sub at once.
 * Beam's reader leaves them in flight until their ack deadline expires (a minute by default),
 * and a bounded read ({@code withMaxNumRecords}, whose readers close as each reaches its share)
 * would wait that long for them.
 */
final class RecentEventTimeSource
    extends UnboundedSource<byte[], UnboundedSource.CheckpointMark> {
  private static final long serialVersionUID = 1L;

  /** How long a reader reads nothing before its watermark follows the wall clock. */
  static final Duration IDLE = Duration.standardMinutes(1);

  private static final Logger LOG = LoggerFactory.getLogger(RecentEventTimeSource.class);

  /** Unread messages handed back to Pub/Sub per request. */
  private static final int NACK_BATCH = 1000;

  /** Stamps read within one bucket of this many milliseconds share one entry. */
  private static final long BUCKET_MS = 100;

  private final UnboundedSource<byte[], CheckpointMark> delegate;
  private final Duration delay;

  private RecentEventTimeSource(UnboundedSource<byte[], CheckpointMark> delegate, Duration delay) {
    this.delegate = delegate;
    this.delay = delay;
  }

  /** The source {@code read} would read itself, behind this watermark. */
  @SuppressWarnings("unchecked")
  static RecentEventTimeSource of(PubsubUnboundedSource read, Duration delay) {
    if (delay.getMillis() < 0) {
      throw new IllegalArgumentException("delay must not be negative: " + delay);
    }
    try {
      // Beam builds this source inside PubsubUnboundedSource.expand(); the class is not public.
      Class<?> sourceClass =
          Class.forName(PubsubUnboundedSource.class.getName() + "$PubsubSource");
      Constructor<?> constructor = sourceClass.getConstructor(PubsubUnboundedSource.class);
      constructor.setAccessible(true);
      return new RecentEventTimeSource(
          (UnboundedSource<byte[], CheckpointMark>) constructor.newInstance(read), delay);
    } catch (ReflectiveOperationException e) {
      throw new IllegalStateException("Beam's PubsubUnboundedSource.PubsubSource not found", e);
    }
  }

  @Override
  public List<RecentEventTimeSource> split(int desiredNumSplits, PipelineOptions options)
      throws Exception {
    List<RecentEventTimeSource> splits = new ArrayList<>();
    for (UnboundedSource<byte[], CheckpointMark> split :
        delegate.split(desiredNumSplits, options)) {
      splits.add(new RecentEventTimeSource(split, delay));
    }
    return splits;
  }

  @Override
  public UnboundedReader<byte[]> createReader(
      PipelineOptions options, @Nullable CheckpointMark checkpoint) throws IOException {
    return new Reader(this, delegate.createReader(options, checkpoint));
  }

  @Override
  public Coder<CheckpointMark> getCheckpointMarkCoder() {
    return delegate.getCheckpointMarkCoder();
  }

  @Override
  public Coder<byte[]> getOutputCoder() {
    return delegate.getOutputCoder();
  }

  @Override
  public boolean requiresDeduping() {
    return delegate.requiresDeduping();
  }

  /** Beam's reader, with the watermark above. */
  static final class Reader extends UnboundedReader<byte[]> {
    private final RecentEventTimeSource source;
    private final UnboundedReader<byte[]> delegate;
    private final long delayMs;
    /** {bucket start, highest stamp read in it} of the last {@code delay}, oldest first. */
    private final ArrayDeque<long[]> recent = new ArrayDeque<>();
    private long settled = BoundedWindow.TIMESTAMP_MIN_VALUE.getMillis();
    /** When this reader last read a message, or was created. */
    private long lastReadMs = System.currentTimeMillis();

    Reader(RecentEventTimeSource source, UnboundedReader<byte[]> delegate) {
      this.source = source;
      this.delegate = delegate;
      this.delayMs = source.delay.getMillis();
    }

    private boolean noted(boolean read) {
      if (read) {
        lastReadMs = System.currentTimeMillis();
        long stamp = delegate.getCurrentTimestamp().getMillis();
        long bucket = System.currentTimeMillis() / BUCKET_MS * BUCKET_MS;
        long[] last = recent.peekLast();
        if (last != null && last[0] == bucket) {
          last[1] = Math.max(last[1], stamp);
        } else {
          recent.addLast(new long[] {bucket, stamp});
        }
      }
      return read;
    }

    @Override
    public boolean start() throws IOException {
      return noted(delegate.start());
    }

    @Override
    public boolean advance() throws IOException {
      return noted(delegate.advance());
    }

    @Override
    public Instant getWatermark() {
      long now = System.currentTimeMillis();
      if (now - lastReadMs > IDLE.getMillis()) {
        return new Instant(now);
      }
      long horizon = now - delayMs;
      while (!recent.isEmpty() && recent.peekFirst()[0] + BUCKET_MS <= horizon) {
        settled = Math.max(settled, recent.pollFirst()[1]);
      }
      Instant beams = delegate.getWatermark();
      return beams.getMillis() >= settled ? beams : new Instant(settled);
    }

    @Override
    public byte[] getCurrent() throws NoSuchElementException {
      return delegate.getCurrent();
    }

    @Override
    public Instant getCurrentTimestamp() throws NoSuchElementException {
      return delegate.getCurrentTimestamp();
    }

    @Override
    public byte[] getCurrentRecordId() throws NoSuchElementException {
      return delegate.getCurrentRecordId();
    }

    @Override
    public CheckpointMark getCheckpointMark() {
      return delegate.getCheckpointMark();
    }

    @Override
    public long getSplitBacklogBytes() {
      return delegate.getSplitBacklogBytes();
    }

    @Override
    public long getTotalBacklogBytes() {
      return delegate.getTotalBacklogBytes();
    }

    @Override
    public void close() throws IOException {
      try {
        releaseUnread();
      } finally {
        delegate.close();
      }
    }

    /**
     * Nacks (an ack deadline of 0) the messages Beam's reader pulled and never handed on, so
     * Pub/Sub delivers them again at once. They were never read, so nothing downstream holds
     * them; a checkpoint that listed them nacks them again when restored (Beam's reader does).
     */
    private void releaseUnread() {
      try {
        Field field = delegate.getClass().getDeclaredField("notYetRead");
        field.setAccessible(true);
        List<String> ackIds = new ArrayList<>();
        for (Object message : (Queue<?>) field.get(delegate)) {
          ackIds.add(((PubsubClient.IncomingMessage) message).ackId());
        }
        Method nack = delegate.getClass().getMethod("nackBatch", long.class, List.class);
        nack.setAccessible(true);
        for (int i = 0; i < ackIds.size(); i += NACK_BATCH) {
          nack.invoke(
              delegate,
              System.currentTimeMillis(),
              new ArrayList<>(ackIds.subList(i, Math.min(ackIds.size(), i + NACK_BATCH))));
        }
      } catch (ReflectiveOperationException | RuntimeException e) {
        // Not fatal: Pub/Sub redelivers them when their ack deadline expires.
        LOG.warn("Could not hand unread Pub/Sub messages back on close", e);
      }
    }

    @Override
    public RecentEventTimeSource getCurrentSource() {
      return source;
    }
  }
}
