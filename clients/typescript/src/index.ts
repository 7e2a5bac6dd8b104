/** batch-supervisor's TypeScript client: see README.md ("TypeScript client"). */

export {
  Client,
  DEFAULT_URL,
  type CallOptions,
  type ClientOptions,
  type EventsOptions,
  type ListBatchesOptions,
  type ListItemsOptions,
  type ResultsOptions,
  type SubmitOptions,
  type WatchOptions,
} from "./client.js";
export { ApiError, ConnectionError } from "./errors.js";
export {
  DEFAULT_TOLERANCE_S,
  SIGNATURE_HEADER,
  verifyWebhook,
  type HeaderRecord,
  type VerifyOptions,
  type WebhookInput,
} from "./webhook.js";
export type * from "./types.js";
