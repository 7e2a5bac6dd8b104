/** An incremental RFC 4180 reader for the CSV results export (records may span lines). */

export class CsvRows {
  private row: string[] = [];
  private field = "";
  private quoted = false; // inside a quoted field
  private afterQuote = false; // just read a closing quote (or the first of "")
  private started = false; // the current record has any content

  /** The records completed by `text`, each as its cells. */
  push(text: string): string[][] {
    const out: string[][] = [];
    for (let i = 0; i < text.length; i++) {
      const c = text[i]!;
      if (this.quoted) {
        if (c === '"') {
          this.quoted = false;
          this.afterQuote = true;
        } else this.field += c;
        continue;
      }
      if (c === '"') {
        if (this.afterQuote) this.field += '"'; // "" inside a quoted field
        this.quoted = true;
        this.afterQuote = false;
        this.started = true;
        continue;
      }
      this.afterQuote = false;
      if (c === ",") {
        this.row.push(this.field);
        this.field = "";
        this.started = true;
      } else if (c === "\n") {
        if (this.field.endsWith("\r")) this.field = this.field.slice(0, -1);
        this.row.push(this.field);
        out.push(this.row);
        this.row = [];
        this.field = "";
        this.started = false;
      } else {
        this.field += c;
        this.started = true;
      }
    }
    return out;
  }

  /** Whether the input so far ended inside a record (the body was cut). */
  get partial(): boolean {
    return this.started || this.quoted || this.field !== "";
  }
}
